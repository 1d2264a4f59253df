"""What the HTTP layer needs from an engine, whichever way it is driven.

Two drivers implement it: EngineThread (engine_thread.py, a background thread of the HTTP process)
and EngineProcess (engine_process.py, the engine in a process of its own, supervised). app.py knows
only this protocol, so it never asks which one it has.
"""

import asyncio
from dataclasses import dataclass
from typing import Protocol

from labkit.engine import LLMEngine, SamplingParams

from .metrics import ServerMetrics


class EngineDead(RuntimeError):
    """The engine is not running (crashed, restarting, or stopped): requests get a 503."""


@dataclass(frozen=True)
class EngineLimits:
    """What the HTTP layer checks requests against (and reports), read from an LLMEngine once."""

    max_context: int
    vocab_size: int
    max_num_seqs: int
    num_blocks: int

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineLimits":
        return cls(
            max_context=engine.max_context,
            vocab_size=engine.model.config.vocab_size,
            max_num_seqs=engine.scheduler.max_num_seqs,
            num_blocks=engine.block_manager.num_blocks,
        )


class EngineClient(Protocol):
    metrics: ServerMetrics | None
    state: str  # "starting" | "ready" | "restarting" | "failed" | "stopped"
    reason: str  # why it is not ready, in words safe for clients ("" when ready)

    @property
    def limits(self) -> EngineLimits:
        """What requests are checked against: the engine's, known once it is built."""

    def start(self) -> None:
        """Begin serving; called on the event loop (the app's startup)."""

    def stop(self) -> None:
        """Stop the engine; whatever is still in flight fails with EngineDead."""

    @property
    def alive(self) -> bool:
        """Requests can be submitted now."""

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet finished or aborted."""

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> asyncio.Queue:
        """Queue a request. The queue receives its StepOutputs (the last has finished=True for each
        of its n samples), or an exception: ValueError (the engine refused it: a 400) or EngineDead."""

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request and free its KV blocks; a no-op for one that has finished."""
