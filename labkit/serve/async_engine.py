"""One background thread owns the engine; asyncio handlers talk to it through a queue.

This is continuous batching as a service: a request that arrives while others are decoding joins the
running batch at the next `engine.step()`. (The naive server wraps `model.generate` in a lock, so
request 64 waits for the 63 before it to finish *completely*.) `step()` is blocking PyTorch work, so it
runs in its own thread; PyTorch releases the GIL inside its kernels, so the event loop keeps serving
HTTP meanwhile. The thread is the only code that touches the engine: handlers send ("add", ...) and
("abort", ...) commands, and get StepOutputs back on a per-request asyncio.Queue.

But the Python *around* the kernels (scheduler, block tables, sampling bookkeeping) needs the GIL, and so
does the event loop (HTTP, JSON, detokenizing, SSE): under load the two take turns on one lock. So
`labkit serve` runs the engine in its own process by default (engine_process.py, same interface);
this in-process thread is `--engine-mode thread`, kept to measure the difference and for GIL-free setups.
"""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Tracked:
    """What the loop knows about a request: where to deliver its tokens, and its timestamps."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: float
    n_prompt: int
    first_token: float | None = None
    last_token: float | None = None
    n_out: int = 0
    token_times: list = field(default_factory=list)


def _put_all(items) -> None:
    for out, item in items:
        out.put_nowait(item)


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def engine_limits(engine) -> dict:
    """What the HTTP layer checks requests against (and reports), read from an LLMEngine once."""
    return {
        "max_context": engine.max_context,
        "vocab_size": engine.model.config.vocab_size,
        "max_num_seqs": engine.scheduler.max_num_seqs,
        "num_blocks": engine.block_manager.num_blocks,
    }


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    """Drive `engine` (labkit.engine.LLMEngine) from a background thread.

    submit() returns an asyncio.Queue that receives StepOutput objects for that request (the last one has
    finished=True), or an exception if the engine rejected it. abort() stops a request and frees its KV
    blocks at the next loop turn. stats is a snapshot refreshed after every step (safe to read anywhere).
    """

    def __init__(self, engine, metrics=None, idle_wait: float = 0.05):
        self.engine, self.idle_wait = engine, idle_wait
        self._setup(metrics, engine.stats(), **engine_limits(engine))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _setup(
        self, metrics, stats, max_context: int, vocab_size: int, max_num_seqs: int, num_blocks: int
    ) -> None:
        """State shared with EngineProcess (engine_process.py): the requests in flight and the counters."""
        self.metrics = metrics
        self.max_context, self.vocab_size, self.max_num_seqs, self.num_blocks = (
            max_context,
            vocab_size,
            max_num_seqs,
            num_blocks,
        )
        self._tracked: dict[str, _Tracked] = {}
        self._outbox: list = []  # (tracked, item) to deliver at the end of this loop turn
        self.stats = stats
        self.steps = 0
        self.step_wall = 0.0  # seconds inside engine.step() ...
        self.step_cpu = 0.0  # ... of which the engine thread was on a CPU (the rest: waiting for the GIL or a core)
        self.tokens = 0  # tokens handed out
        self.error: BaseException | None = None

    # ---- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="labkit-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet finished/aborted (queued in the inbox, waiting or running)."""
        return len(self._tracked)

    def submit(self, request_id: str, prompt_ids: list[int], params) -> asyncio.Queue:
        if not self.alive:
            raise EngineDead(f"the engine loop is not running: {self.error!r}")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._tracked[request_id] = _Tracked(loop, out, time.perf_counter(), len(prompt_ids))
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return out

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request (client went away, stop string found): its KV blocks are freed next turn."""
        self._inbox.put(("abort", request_id, reason))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the background thread ---------------------------------------------------------------------
    def _deliver(self, t: _Tracked, item) -> None:
        self._outbox.append((t, item))

    def _flush(self) -> None:
        """Hand everything one loop turn produced to the event loop in ONE call_soon_threadsafe.

        Each call_soon_threadsafe writes a byte to the loop's self-pipe (a syscall) and makes the event
        loop wake up, take the GIL and run a callback: per token that is 64 wake-ups per step at batch
        64, and each one can take the GIL away from the engine thread in the middle of its forward pass
        (measured: ~5% of the engine thread's samples were in call_soon_threadsafe)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for t, item in self._outbox:
            by_loop.setdefault(t.loop, []).append((t.out, item))
        self._outbox = []
        for loop, items in by_loop.items():
            if _running_loop() is loop:  # EngineProcess: already on the event loop
                _put_all(items)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, items)
            # the event loop is closed (server shutting down): nobody is listening
            except RuntimeError:
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt_ids, params = cmd
                t = self._tracked.get(rid)
                if t is None:  # aborted before it was ever added
                    continue
                try:
                    self.engine.add_request(rid, prompt_ids, params)
                except (
                    Exception
                ) as err:  # ValueError: too long, bad params... -> the handler raises it
                    self._tracked.pop(rid, None)
                    self._deliver(t, err)
            else:
                _, rid, reason = cmd
                t = self._tracked.pop(rid, None)
                if t is not None:
                    self.engine.abort_request(rid)
                    if self.metrics:
                        self.metrics.finished(
                            reason, time.perf_counter() - t.arrival, t.n_prompt, t.n_out
                        )

    def _record(self, out, now: float) -> None:
        t = self._tracked.get(out.request_id)
        if t is None:
            return
        n_new = len(out.new_token_ids)
        if n_new:
            if t.first_token is None:
                t.first_token = now
                if self.metrics:
                    self.metrics.ttft.observe(now - t.arrival)
                    self.metrics.prompt_tokens.inc(out.num_prompt_tokens)
            elif self.metrics:
                gap = (now - t.last_token) / n_new
                for _ in range(n_new):
                    self.metrics.itl.observe(gap)
            t.last_token = now
            t.n_out += n_new
            self.tokens += n_new
            if self.metrics:
                self.metrics.generation_tokens.inc(n_new)
        if out.finished:
            self._tracked.pop(out.request_id, None)
            if self.metrics:
                e2e = now - t.arrival
                if t.n_out > 1 and t.first_token is not None:
                    tpot = (now - t.first_token) / (t.n_out - 1)
                    self.metrics.tpot.observe(tpot)
                    self.metrics.tpot_old.observe(tpot)
                self.metrics.finished(
                    out.finish_reason or "stop", e2e, out.num_prompt_tokens, t.n_out
                )
        self._deliver(t, out)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                self._flush()  # rejections from add_request: answer now, not after a step or idle wait
                if self.engine.has_unfinished_requests():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    outputs = self.engine.step()
                    now, cpu = time.perf_counter(), time.thread_time() - c0
                    self.steps += 1
                    self.step_wall += now - t0
                    self.step_cpu += cpu
                    if self.metrics:
                        self.metrics.engine_step(now - t0, cpu)
                    for out in outputs:
                        self._record(out, now)
                else:
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
                self._flush()
                self.stats = self.engine.stats()
                if self.metrics:
                    self.metrics.update_engine_stats(self.stats, len(self._tracked))
        except BaseException as err:  # a crashed engine must not leave clients waiting forever
            self.error = err
            for t in list(self._tracked.values()):
                self._deliver(t, EngineDead(f"engine loop crashed: {err!r}"))
            self._tracked.clear()
            self._flush()
            raise
        finally:
            for rid in list(self._tracked):  # stopped with requests in flight: abort them cleanly
                t = self._tracked.pop(rid)
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    pass
                self._deliver(t, EngineDead("server is shutting down"))
            self._flush()
