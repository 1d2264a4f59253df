"""The engine in its own process, so the HTTP server and the engine stop taking turns on one GIL.

Why: in one process the asyncio event loop (HTTP, JSON, detokenizing and SSE for every stream) and the
engine thread share ONE interpreter lock. PyTorch drops it inside its kernels, but the Python around them
(scheduler, block tables, sampling bookkeeping) needs it, so under load each waits for the other:
measured at 64 streaming clients, the engine thread waited ~14% of its step time and the server reached
~0.8x the offline engine's throughput. vLLM hit the same wall; since v1 its EngineCore runs in a process
of its own, apart from the API server. This is that split, in miniature:

    HTTP process (event loop)                      engine process
      submit / abort / stop  --- command pipe --->   receiver thread -> queue
                                                     loop: apply commands, engine.step()
      loop.add_reader(fd)    <--- one message per step ---
                                 [(request_id, new token ids, finished, reason, n_prompt, n_output)],
                                 engine stats, step wall and CPU time

The HTTP process tokenizes, validates, detokenizes, streams and records the metrics (so latencies are
measured when tokens reach it, as a client sees them); the engine process only adds, aborts and steps.
It is started with "spawn", never fork (forking a process whose torch thread pools are running can
deadlock), and builds its own model and engine from the same CLI arguments. If it dies, every waiting
client gets an error and /health and /ready report it; it dies with its parent (PR_SET_PDEATHSIG) and
is stopped with the server, after the drain.
"""

import asyncio
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback

from labkit.engine import StepOutput

from .async_engine import AsyncEngine, EngineDead, _Tracked, engine_limits


class EngineProcess(AsyncEngine):
    """AsyncEngine's interface (submit, abort, stop, stats, alive, num_active, steps, ...), the engine in a child.

    The constructor starts the child; wait_ready() waits until its model is loaded (so a bad model path
    fails `labkit serve` at once, with the child's traceback); start(), on the event loop, begins reading
    its messages. Everything after that runs on the event loop's thread (submit, abort, the reader)."""

    def __init__(self, args, metrics=None):
        ctx = multiprocessing.get_context("spawn")
        cmd_child, self._cmd = ctx.Pipe(duplex=False)  # commands: parent -> child
        self._out, out_child = ctx.Pipe(duplex=False)  # outputs: child -> parent
        # started from the main thread: PR_SET_PDEATHSIG fires when the *thread* that started the child exits
        self.process = ctx.Process(
            target=_child_main,
            args=(args, cmd_child, out_child, os.getpid()),
            name="labkit-engine",
            daemon=True,
        )
        self.process.start()
        cmd_child.close()  # the child holds these ends now: EOF on ours means the child is gone
        out_child.close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics = metrics
        self._tracked: dict = {}  # (the rest of the state comes with the child's "ready" message)
        self.error: BaseException | None = None

    def wait_ready(self, timeout: float = 600.0) -> "EngineProcess":
        """Block until the child has built its engine; raise with its traceback if it could not."""
        try:
            if not self._out.poll(timeout):
                raise TimeoutError(f"the engine process did not load its model within {timeout}s")
            kind, info = self._out.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"the engine process exited with code {self.process.exitcode} while starting"
            ) from None
        except BaseException:
            self._kill()
            raise
        if kind == "error":
            self._kill()
            raise RuntimeError(f"the engine process failed to start:\n{info}")
        self._setup(self._metrics, info.pop("stats"), **info)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    # ---- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(self._out.fileno(), self._on_readable)
        except NotImplementedError:  # Windows' proactor event loop
            raise RuntimeError(
                "--engine-mode process needs an event loop that can watch a pipe (Linux, macOS); "
                "use --engine-mode thread here"
            ) from None
        self._loop = loop

    @property
    def alive(self) -> bool:
        return self._loop is not None and self.error is None and self.process.is_alive()

    def submit(self, request_id: str, prompt_ids: list[int], params) -> asyncio.Queue:
        if not self.alive:
            raise EngineDead(f"the engine process is not running: {self.error!r}")
        out: asyncio.Queue = asyncio.Queue()
        self._tracked[request_id] = _Tracked(self._loop, out, time.perf_counter(), len(prompt_ids))
        self._send(("add", request_id, prompt_ids, params))
        return out

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request (client went away, stop string found); the child frees its KV blocks next turn.
        Forgotten here at once: tokens of it still in the pipe are dropped when they arrive."""
        t = self._tracked.pop(request_id, None)
        if t is None:  # finished, rejected or aborted already
            return
        if self.metrics:
            self.metrics.finished(reason, time.perf_counter() - t.arrival, t.n_prompt, t.n_out)
        self._send(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (after the drain: nothing should be in flight) and fail whatever still is."""
        self._unwatch()
        try:
            self._cmd.send(("stop",))
        except OSError:
            pass
        self.process.join(timeout)
        self._kill()
        if self._tracked:
            self._fail_all(EngineDead("server is shutting down"))

    # ---- plumbing ----------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        try:
            self._cmd.send(msg)
        except OSError:  # BrokenPipeError: the child is gone
            self._died()

    def _on_readable(self) -> None:
        """The child wrote: take every complete message, deliver the tokens, flush once."""
        try:
            while self._out.poll():
                msg = self._out.recv()
                if msg[0] == "error":
                    return self._died(f"the engine process crashed:\n{msg[1]}")
                self._handle(*msg[1:])
        except (EOFError, OSError):
            return self._died()
        self._flush()
        if self.metrics:
            self.metrics.update_engine_stats(self.stats, len(self._tracked))

    def _handle(self, outputs, rejected, stats, wall, cpu) -> None:
        now = time.perf_counter()
        self.stats = stats
        for rid, err in rejected:  # add_request refused it (too long...): the handler raises it
            t = self._tracked.pop(rid, None)
            if t is not None:
                self._deliver(t, err)
        if wall is not None:
            self.steps += 1
            self.step_wall += wall
            self.step_cpu += cpu
            if self.metrics:
                self.metrics.engine_step(wall, cpu)
        for out in outputs:
            self._record(StepOutput(*out), now)

    def _died(self, detail: str | None = None) -> None:
        if self.error is not None:
            return
        self._unwatch()
        self.process.join(1.0)
        self.error = EngineDead(
            detail or f"the engine process exited (exit code {self.process.exitcode})"
        )
        self._fail_all(self.error)

    def _fail_all(self, err: BaseException) -> None:
        for t in self._tracked.values():
            self._deliver(t, err)
        self._tracked.clear()
        self._flush()
        if self.metrics:
            self.metrics.update_engine_stats(self.stats, 0)

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._out.fileno())
            except (ValueError, OSError):  # already closed
                pass

    def _kill(self) -> None:
        for end in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                return
            end()
            self.process.join(5)


# ---- the child ---------------------------------------------------------------------------------------
def _child_main(args, cmd, out, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal signals the whole process group; the parent decides when the engine stops
    # (after draining in-flight requests), so the child ignores SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from .cli import build_engine

        engine = build_engine(args)
        out.send(("ready", {"stats": engine.stats(), **engine_limits(engine)}))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        # a thread drains the command pipe as commands come, so the parent's send() never waits for a step
        threading.Thread(
            target=_receive, args=(cmd, inbox), name="labkit-engine-commands", daemon=True
        ).start()
        _engine_loop(engine, inbox, out)
    except BaseException:
        try:
            out.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None


def _receive(cmd, inbox: queue.SimpleQueue) -> None:
    try:
        while True:
            inbox.put(cmd.recv())
    except (EOFError, OSError):
        inbox.put(("stop",))  # the parent is gone


def _engine_loop(engine, inbox: queue.SimpleQueue, out) -> None:
    while True:
        # idle: sleep until a command comes; busy: take what has come and step
        cmds = [] if engine.has_unfinished_requests() else [inbox.get()]
        while True:
            try:
                cmds.append(inbox.get_nowait())
            except queue.Empty:
                break
        rejected = []
        for cmd in cmds:
            if cmd[0] == "add":
                _, rid, prompt_ids, params = cmd
                try:
                    engine.add_request(rid, prompt_ids, params)
                except ValueError as err:  # too long, bad parameters: becomes a 400
                    rejected.append((rid, ValueError(str(err))))
                except Exception as err:
                    rejected.append((rid, RuntimeError(f"{type(err).__name__}: {err}")))
            elif cmd[0] == "abort":
                engine.abort_request(cmd[1])
            else:  # "stop"
                return
        if rejected:  # answer now, not after the next step
            out.send(("out", [], rejected, engine.stats(), None, 0.0))
        if engine.has_unfinished_requests():
            t0, c0 = time.perf_counter(), time.thread_time()
            outputs = engine.step()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            out.send(
                (
                    "out",
                    [
                        (
                            o.request_id,
                            o.new_token_ids,
                            o.finished,
                            o.finish_reason,
                            o.num_prompt_tokens,
                            o.num_output_tokens,
                        )
                        for o in outputs
                    ],
                    [],
                    engine.stats(),
                    wall,
                    cpu,
                )
            )
        elif cmds and not rejected:  # aborts freed blocks and nothing runs: refresh the gauges
            out.send(("out", [], [], engine.stats(), None, 0.0))


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the server process dies, however it dies (even SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
