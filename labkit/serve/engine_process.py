"""The engine in its own process, so the HTTP server and the engine stop taking turns on one GIL; and
supervised, so a dead engine is replaced instead of taking the service down for good.

Why a process: in one process the asyncio event loop (HTTP, JSON, detokenizing and SSE for every
stream) and the engine thread share ONE interpreter lock. PyTorch drops it inside its kernels, but the
Python around them (scheduler, block tables, sampling bookkeeping) needs it, so under load each waits
for the other: measured at 64 streaming clients, the engine thread waited ~14% of its step time and
the server reached ~0.8x the offline engine's throughput. vLLM hit the same wall; since v1 its
EngineCore runs in a process of its own, apart from the API server. This is that split, in miniature:

    HTTP process (event loop)                      engine process
      Add / Abort / Stop      --- command pipe --->   receiver thread -> queue
                                                      loop: apply commands, engine.step()
      loop.add_reader(fd)     <--- Ready, then one Step per engine step (messages.py)

The HTTP process tokenizes, validates, detokenizes, streams and records the metrics (so latencies are
measured when tokens reach it, as a client sees them); the engine process only adds, aborts and steps.
It is started with "spawn", never fork (forking a process whose torch thread pools are running can
deadlock), and builds its own engine from the same EngineArgs. It dies with its parent
(PR_SET_PDEATHSIG) and is stopped with the server, after the drain.

Supervision: if the engine process dies (a crash, the OOM killer, kill -9), every request in flight
fails at once with a 503 (streams get an error event), the server log says what happened, and a new
engine process is started; /ready is 503 until it has loaded its model. A crash loop is bounded:
after `max_restarts` deaths within `restart_window` seconds the server stays unready and says why.
"""

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque

from labkit.engine import LLMEngine, SamplingParams

from .engine_args import EngineArgs
from .engine_client import EngineDead, EngineLimits
from .engine_thread import apply_lora_command
from .messages import Abort, Add, Crashed, LoadLoRA, Ready, Rejected, Step, Stop, UnloadLoRA
from .metrics import ServerMetrics
from .tracker import RequestTracker

log = logging.getLogger("labkit.serve")


class Child:
    """One engine process and its two pipes."""

    def __init__(self, args: EngineArgs):
        ctx = multiprocessing.get_context("spawn")
        cmd_child, self.commands = ctx.Pipe(duplex=False)  # parent -> child
        self.events, events_child = ctx.Pipe(duplex=False)  # child -> parent
        # started from the main thread: PR_SET_PDEATHSIG fires when the *thread* that started it exits
        self.process = ctx.Process(
            target=child_main,
            args=(args, cmd_child, events_child, os.getpid()),
            name="labkit-engine",
            daemon=True,
        )
        self.process.start()
        cmd_child.close()  # the child holds these ends now: EOF on ours means the child is gone
        events_child.close()

    def send(self, msg) -> bool:
        """False if the child is gone (broken pipe)."""
        try:
            self.commands.send(msg)
            return True
        except OSError:
            return False

    def exit_description(self) -> str:
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "its pipe closed"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit code {code}"

    def kill(self) -> None:
        for end in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                break
            end()
            self.process.join(5)
        self.commands.close()
        self.events.close()


class EngineProcess:
    """An EngineClient (engine_client.py) whose engine runs in a supervised child process.

    The constructor starts the child; wait_ready() blocks until its model is loaded (so a bad model
    path fails `labkit serve` at once, with the child's traceback); start(), on the event loop, begins
    reading its messages. Everything after that runs on the event loop's thread."""

    def __init__(
        self,
        args: EngineArgs,
        metrics: ServerMetrics | None = None,
        max_restarts: int = 3,
        restart_window: float = 300.0,
    ):
        self.args, self.max_restarts, self.restart_window = args, max_restarts, restart_window
        self.tracker = RequestTracker(metrics)
        self.child = Child(args)
        self._limits: EngineLimits | None = None  # the child's engine's, once it is ready
        self.state = "starting"  # -> ready -> (restarting -> ready)* -> failed | stopped
        self.reason = ""  # why it is not ready, in words safe for clients
        self.deaths: deque[float] = deque()
        self.restarts = 0
        self.started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        # the adapters served now (--lora-modules, then loads and unloads), name -> path: a restarted
        # engine starts from `args` alone, so they are replayed into it
        self.loras: dict[str, str] | None = None

    @property
    def metrics(self) -> ServerMetrics | None:
        return self.tracker.metrics

    @metrics.setter
    def metrics(self, value: ServerMetrics | None) -> None:
        self.tracker.metrics = value

    @property
    def limits(self) -> EngineLimits:
        if self._limits is None:
            raise RuntimeError("the engine process is not ready yet: call wait_ready() first")
        return self._limits

    @property
    def pid(self) -> int | None:
        return self.child.process.pid

    def wait_ready(self, timeout: float = 600.0) -> "EngineProcess":
        """Block until the first child has built its engine; raise with its traceback if it could not."""
        try:
            if not self.child.events.poll(timeout):
                raise TimeoutError(f"the engine process did not load its model within {timeout}s")
            msg = self.child.events.recv()
        except EOFError:
            self.child.kill()
            raise RuntimeError(
                f"the engine process stopped while starting ({self.child.exit_description()})"
            ) from None
        except BaseException:
            self.child.kill()
            raise
        if isinstance(msg, Crashed):
            self.child.kill()
            raise RuntimeError(f"the engine process failed to start:\n{msg.detail}")
        self._ready(msg)
        return self

    # ---- the EngineClient protocol (on the event loop) --------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch()

    @property
    def alive(self) -> bool:
        return self._loop is not None and self.state == "ready"

    @property
    def num_active(self) -> int:
        return len(self.tracker)

    def load_lora(self, name: str, path: str) -> None:
        self._served_loras()[name] = path
        self.child.send(LoadLoRA(name, path))

    def unload_lora(self, name: str) -> None:
        self._served_loras().pop(name, None)
        self.child.send(UnloadLoRA(name))

    def _served_loras(self) -> dict[str, str]:
        if self.loras is None:
            self.loras = dict(self.limits.loras)
        return self.loras

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, lora=None):
        if not self.alive:
            raise EngineDead(f"The engine is not running ({self.state}); retry shortly.")
        out = self.tracker.add(request_id, len(prompt_ids), params.n)
        if not self.child.send(Add(request_id, prompt_ids, params, lora)):
            self._died()
        return out

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Forgotten here at once (tokens of it still in the pipe are dropped when they arrive); the
        child frees its KV blocks on its next turn."""
        if self.tracker.aborted(request_id, reason):
            self.child.send(Abort(request_id, reason))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (after the drain: nothing should be in flight) and fail whatever still is."""
        self.state, self.reason = "stopped", "the server is shutting down"
        self._unwatch()
        self.child.send(Stop())
        self.child.process.join(timeout)
        self.child.kill()
        self.tracker.fail_all(EngineDead("The server is shutting down."))

    # ---- messages from the child -----------------------------------------------------------------
    def _watch(self) -> None:
        if self._loop is None:
            raise RuntimeError(
                "call start() first: the child's pipe is watched on start()'s event loop"
            )
        try:
            self._loop.add_reader(self.child.events.fileno(), self._on_readable)
        except NotImplementedError:  # Windows' proactor event loop
            raise RuntimeError(
                "--engine-mode process needs an event loop that can watch a pipe (Linux, macOS); "
                "use --engine-mode thread here"
            ) from None

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.child.events.fileno())
            except (ValueError, OSError):  # already closed
                pass

    def _on_readable(self) -> None:
        """The child wrote: take every complete message, deliver the outputs, flush once."""
        try:
            while self.child.events.poll():
                msg = self.child.events.recv()
                if isinstance(msg, Step):
                    self._step(msg)
                elif isinstance(msg, Ready):
                    self._ready(msg)
                else:  # Crashed: it sent its traceback and exits
                    return self._died(msg.detail)
        except (EOFError, OSError):
            return self._died()
        self.tracker.flush()

    def _ready(self, msg: Ready) -> None:
        if self._limits is not None and msg.limits != self._limits:  # same args, same engine
            log.warning(
                "the restarted engine has other limits: %s (was %s)", msg.limits, self._limits
            )
        self._limits = msg.limits
        if self.state == "restarting":
            log.warning(
                "engine process %d ready after %.1f s (restart %d)",
                self.pid,
                time.monotonic() - self.started_at,
                self.restarts,
            )
        self.state, self.reason = "ready", ""
        self.tracker.engine_stats(msg.stats)

    def _step(self, msg: Step) -> None:
        now = time.perf_counter()
        for r in msg.rejected:
            self.tracker.reject(r.request_id, ValueError(r.message))
        if msg.wall is not None:
            self.tracker.engine_step(msg.wall, msg.cpu)
        for out in msg.outputs:
            self.tracker.record(out, now)
        self.tracker.engine_stats(msg.stats)

    # ---- supervision --------------------------------------------------------------------------------
    def _died(self, detail: str | None = None) -> None:
        if self.state in ("stopped", "failed"):
            return
        self._unwatch()
        how = self.child.exit_description()
        log.error(
            "engine process %d died (%s) with %d requests in flight%s",
            self.pid,
            how,
            len(self.tracker),
            f":\n{detail}" if detail else "",
        )
        self.tracker.fail_all(
            EngineDead("The engine process stopped unexpectedly; the request was not completed.")
        )
        self.child.kill()
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > self.restart_window:
            self.deaths.popleft()
        if len(self.deaths) > self.max_restarts:
            self.state = "failed"
            self.reason = (
                f"the engine process died {len(self.deaths)} times within "
                f"{self.restart_window:.0f} s; not restarting it (details in the server log)"
            )
            log.error("%s", self.reason)
            return
        self.restarts += 1
        self.state, self.reason = "restarting", f"the engine process died ({how}); restarting it"
        self.started_at = now
        log.warning("restarting the engine process (restart %d)", self.restarts)
        self.child = Child(self.args)
        if self.loras is not None:  # adapters were loaded or unloaded at run time: the same again
            for name, _ in self.limits.loras:
                self.child.send(UnloadLoRA(name))
            for name, path in self.loras.items():
                self.child.send(LoadLoRA(name, path))
        self._watch()


# ---- the child ---------------------------------------------------------------------------------------
def child_main(args: EngineArgs, commands, events, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # Ctrl-C in a terminal signals the whole process group; the parent decides when the engine stops
    # (after draining in-flight requests), so the child ignores SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = args.build_engine()
        events.send(Ready(EngineLimits.of(engine), engine.stats()))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        # a thread drains the command pipe as commands come, so the parent's send() never waits for a step
        threading.Thread(
            target=receive, args=(commands, inbox), name="labkit-engine-commands", daemon=True
        ).start()
        engine_loop(engine, inbox, events)
    except BaseException:
        try:
            events.send(Crashed(traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None


def receive(commands, inbox: queue.SimpleQueue) -> None:
    try:
        while True:
            inbox.put(commands.recv())
    except (EOFError, OSError):
        inbox.put(Stop())  # the parent is gone


def apply_commands(engine: LLMEngine, cmds: list) -> tuple[list[Rejected], bool]:
    """Add and abort; returns the rejected requests and whether a Stop came."""
    rejected = []
    for cmd in cmds:
        if isinstance(cmd, Add):
            try:
                engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.lora)
            except ValueError as err:  # too long for the KV cache, bad parameters: becomes a 400
                rejected.append(Rejected(cmd.request_id, str(err)))
        elif isinstance(cmd, (LoadLoRA, UnloadLoRA)):
            apply_lora_command(engine, cmd)
        elif isinstance(cmd, Abort):
            engine.abort_request(cmd.request_id)
        else:
            return rejected, True
    return rejected, False


def engine_loop(engine: LLMEngine, inbox: queue.SimpleQueue, events) -> None:
    while True:
        # idle: sleep until a command comes; busy: take what has come and step
        cmds = [] if engine.has_unfinished_requests() else [inbox.get()]
        while True:
            try:
                cmds.append(inbox.get_nowait())
            except queue.Empty:
                break
        rejected, stop = apply_commands(engine, cmds)
        if stop:
            return
        if rejected:  # answer now, not after the next step
            events.send(Step([], rejected, engine.stats()))
        if engine.has_unfinished_requests():
            t0, c0 = time.perf_counter(), time.thread_time()
            outputs = engine.step()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            events.send(Step(outputs, [], engine.stats(), wall, cpu))
        elif cmds and not rejected:  # aborts freed blocks and nothing runs: refresh the gauges
            events.send(Step([], [], engine.stats()))


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the server process dies, however it dies (even SIGKILL)."""
    try:
        import ctypes  # (Linux only; nothing else here needs it)

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
