"""What the HTTP layer needs from an engine, whichever way it is driven.

Two drivers implement it: EngineThread (engine_thread.py, a background thread of the HTTP process)
and EngineProcess (engine_process.py, the engine in a process of its own, supervised). app.py knows
only this protocol, so it never asks which one it has.
"""

import asyncio
from dataclasses import dataclass
from typing import Protocol

from labkit.engine import LLMEngine, SamplingParams
from labkit.engine.lora import BaseShapes

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
    # LoRA: what an adapter must fit (None: LoRA is off), the largest rank, and the adapters the engine
    # was built with (--lora-modules), as (name, path)
    lora_base: BaseShapes | None = None
    max_lora_rank: int = 0
    loras: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineLimits":
        return cls(
            max_context=engine.max_context,
            vocab_size=engine.model.config.vocab_size,
            max_num_seqs=engine.scheduler.max_num_seqs,
            num_blocks=engine.block_manager.num_blocks,
            lora_base=engine.lora_base if engine.config.enable_lora else None,
            max_lora_rank=engine.config.max_lora_rank,
            loras=tuple((name, a.path) for name, a in engine.adapters.items()),
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
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> asyncio.Queue:
        """Queue a request (with `lora`, a loaded adapter's name). The queue receives its StepOutputs
        (the last has finished=True for each of its n samples), or an exception: ValueError (the engine
        refused it: a 400) or EngineDead."""

    def load_lora(self, name: str, path: str) -> None:
        """Register an adapter the caller has checked (lora.py); requests submitted after may name it."""

    def unload_lora(self, name: str) -> None:
        """Forget an adapter; requests already submitted with it finish with it."""

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request and free its KV blocks; a no-op for one that has finished."""
