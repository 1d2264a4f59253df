"""A request inside the engine: its tokens so far, how many of them are already in the KV cache, and the
block table that says where in the paged cache those keys and values live."""

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by everything generated so far
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # order of arrival: the scheduler is FIFO on this
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    # tokens whose K/V are in the cache (the rest still need a forward)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # logical block i -> physical block id
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash of each *full* block
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
