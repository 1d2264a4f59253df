"""The requests a driver has in flight: where each one's outputs go, and the latency metrics they feed.

Both drivers (engine_thread.py, engine_process.py) own one. Outputs are collected during one loop
turn and handed to the event loop in one call (flush), and the latency histograms are observed the
moment a step's tokens reach this process, as a client would see them.
"""

import asyncio
import time
from dataclasses import dataclass

from labkit.engine import EngineStats, StepOutput

from .metrics import ServerMetrics


@dataclass
class Tracked:
    """What the driver knows about one request: where to deliver its outputs, and its timestamps."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: float
    n_prompt: int
    samples_left: int  # of its n samples, those not finished yet
    first_token: float | None = None
    last_token: float | None = None
    n_out: int = 0  # tokens of all its samples


def _put_all(items) -> None:
    for out, item in items:
        out.put_nowait(item)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RequestTracker:
    def __init__(self, metrics: ServerMetrics | None = None):
        self.metrics = metrics
        self.requests: dict[str, Tracked] = {}
        self._outbox: list[tuple[Tracked, object]] = []  # (request, item) to deliver at flush()

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, request_id: str, n_prompt: int, n_samples: int) -> asyncio.Queue:
        """Called on the event loop: the queue the request's outputs will arrive on."""
        out: asyncio.Queue = asyncio.Queue()
        self.requests[request_id] = Tracked(
            asyncio.get_running_loop(), out, time.perf_counter(), n_prompt, n_samples
        )
        return out

    def reject(self, request_id: str, err: BaseException) -> None:
        """The engine refused it (ValueError: too long...) or could not take it: the handler raises err."""
        t = self.requests.pop(request_id, None)
        if t is not None:
            self._outbox.append((t, err))

    def aborted(self, request_id: str, reason: str) -> bool:
        """Forget a request that was stopped early; False if it had finished (or was never added)."""
        t = self.requests.pop(request_id, None)
        if t is None:
            return False
        if self.metrics:
            self.metrics.finished(reason, time.perf_counter() - t.arrival, t.n_prompt, t.n_out)
        return True

    def record(self, out: StepOutput, now: float) -> None:
        """One StepOutput of one sample: latency metrics, then queue it for its request."""
        t = self.requests.get(out.request_id)
        if t is None:  # aborted meanwhile: its last tokens are dropped
            return
        n_new = len(out.new_token_ids)
        if n_new:
            self._observe_tokens(t, n_new, now, out.num_prompt_tokens)
        if out.finished:
            t.samples_left -= 1
            if t.samples_left == 0:
                self.requests.pop(out.request_id, None)
                self._observe_finished(t, now, out.finish_reason or "stop")
        self._outbox.append((t, out))

    def _observe_tokens(self, t: Tracked, n_new: int, now: float, n_prompt: int) -> None:
        m = self.metrics
        last, t.last_token = t.last_token, now
        if last is None:  # its first tokens
            t.first_token = now
            if m:
                m.ttft.observe(now - t.arrival)
                m.prompt_tokens.inc(n_prompt)
        elif m:
            gap = (now - last) / n_new
            for _ in range(n_new):
                m.itl.observe(gap)
        t.n_out += n_new
        if m:
            m.generation_tokens.inc(n_new)

    def _observe_finished(self, t: Tracked, now: float, reason: str) -> None:
        m = self.metrics
        if not m:
            return
        if t.n_out > 1 and t.first_token is not None:
            tpot = (now - t.first_token) / (t.n_out - 1)
            m.tpot.observe(tpot)
            m.tpot_old.observe(tpot)
        m.finished(reason, now - t.arrival, t.n_prompt, t.n_out)

    def engine_step(self, wall: float, cpu: float) -> None:
        if self.metrics:
            self.metrics.engine_step(wall, cpu)

    def engine_stats(self, stats: EngineStats) -> None:
        if self.metrics:
            self.metrics.update_engine_stats(stats, len(self.requests))

    def fail_all(self, err: BaseException) -> None:
        """Every request in flight gets `err` (the engine died or stopped): no client is left waiting."""
        for t in self.requests.values():
            self._outbox.append((t, err))
        self.requests.clear()
        self.flush()

    def flush(self) -> None:
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
            except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
                pass
