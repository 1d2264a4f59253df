"""One background thread owns the engine; asyncio handlers talk to it through a queue.

This is continuous batching as a service: a request that arrives while others are decoding joins the
running batch at the next `engine.step()`. (The naive server wraps `model.generate` in a lock, so
request 64 waits for the 63 before it to finish *completely*.) `step()` is blocking PyTorch work, so it
runs in its own thread; PyTorch releases the GIL inside its kernels, so the event loop keeps serving
HTTP meanwhile. The thread is the only code that touches the engine: handlers send Add and Abort
commands (messages.py), and get StepOutputs back on a per-request asyncio.Queue.

But the Python *around* the kernels (scheduler, block tables, sampling bookkeeping) needs the GIL, and so
does the event loop (HTTP, JSON, detokenizing, SSE): under load the two take turns on one lock. So
`labkit serve` runs the engine in its own process by default (engine_process.py, same protocol);
this in-process thread is `--engine-mode thread`, kept to measure the difference and for GIL-free setups.
"""

import logging
import queue
import threading
import time

from labkit.engine import LLMEngine, SamplingParams

from .engine_client import EngineDead, EngineLimits
from .messages import Abort, Add, LoadLoRA, UnloadLoRA
from .metrics import ServerMetrics
from .tracker import RequestTracker

log = logging.getLogger("labkit.serve")


def apply_lora_command(engine: LLMEngine, cmd: LoadLoRA | UnloadLoRA) -> None:
    """Load or unload an adapter. The HTTP process checked it already, so a failure here (the files
    changed since) is logged, and requests naming it are refused (a 400) by add_request."""
    if isinstance(cmd, UnloadLoRA):
        engine.remove_lora(cmd.name)
        return
    try:
        engine.add_lora(cmd.name, cmd.path)
    except ValueError:
        log.exception("could not load LoRA adapter %r from %s", cmd.name, cmd.path)


class EngineThread:
    """Drive `engine` from a background thread (an EngineClient, see engine_client.py)."""

    def __init__(
        self, engine: LLMEngine, metrics: ServerMetrics | None = None, idle_wait: float = 0.05
    ):
        self.engine, self.idle_wait = engine, idle_wait
        self.limits = EngineLimits.of(engine)
        self.tracker = RequestTracker(metrics)
        self.state, self.reason = "starting", ""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def metrics(self) -> ServerMetrics | None:
        return self.tracker.metrics

    @metrics.setter
    def metrics(self, value: ServerMetrics | None) -> None:
        self.tracker.metrics = value

    # ---- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="labkit-engine-loop", daemon=True)
        self._thread.start()
        self.state = "ready"

    @property
    def alive(self) -> bool:
        return self.state == "ready"

    @property
    def num_active(self) -> int:
        return len(self.tracker)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, lora=None):
        if not self.alive:
            raise EngineDead(f"The engine is not running ({self.state}).")
        out = self.tracker.add(request_id, len(prompt_ids), params.n)
        self._inbox.put(Add(request_id, prompt_ids, params, lora))
        self._wake.set()
        return out

    def load_lora(self, name: str, path: str) -> None:
        self._inbox.put(LoadLoRA(name, path))

    def unload_lora(self, name: str) -> None:
        self._inbox.put(UnloadLoRA(name))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._inbox.put(Abort(request_id, reason))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self.state != "failed":
            self.state, self.reason = "stopped", "the server is shutting down"
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the background thread ---------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Add):
                if cmd.request_id not in self.tracker.requests:  # aborted before it was added
                    continue
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.lora)
                except ValueError as err:  # too long for the KV cache...: the handler's 400
                    self.tracker.reject(cmd.request_id, err)
            elif isinstance(cmd, (LoadLoRA, UnloadLoRA)):
                apply_lora_command(self.engine, cmd)
            elif self.tracker.aborted(cmd.request_id, cmd.reason):
                self.engine.abort_request(cmd.request_id)

    def _step(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = self.engine.step()
        now, cpu = time.perf_counter(), time.thread_time() - c0
        self.tracker.engine_step(now - t0, cpu)
        for out in outputs:
            self.tracker.record(out, now)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                self.tracker.flush()  # rejections: answer now, not after a step or idle wait
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
                self.tracker.flush()
                self.tracker.engine_stats(self.engine.stats())
        except BaseException:  # a crashed engine must not leave clients waiting forever
            log.exception("the engine thread crashed")
            self.state = "failed"
            self.reason = "the engine thread crashed (details in the server log)"
            self.tracker.fail_all(EngineDead("The engine crashed; the request was not completed."))
        finally:
            for rid in list(self.tracker.requests):  # stopped with requests in flight: free them
                self.engine.abort_request(rid)
            self.tracker.fail_all(EngineDead("The server is shutting down."))
