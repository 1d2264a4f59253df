"""A request inside the engine: its tokens so far, how many of them are already in the KV cache, and the
block table that says where in the paged cache those keys and values live.

A request asking for n > 1 samples starts as one Sequence (index 0) that prefills the prompt once; when its
first token is sampled, it forks into n Sequences that share the prompt's blocks (see block_manager.py).
"""

import enum
from dataclasses import dataclass, field

import torch
from llguidance import LLMatcher

from .lora import LoRAAdapter
from .sampling import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)  # compared by identity: the n samples of a request share its id and its prompt
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by everything generated so far
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # order of arrival: the scheduler is FIFO on this
    generator: torch.Generator | None = None
    block_size: int = 16  # the engine's block size, for the block helpers below
    index: int = 0  # which of the request's n samples this is
    status: Status = Status.WAITING
    # tokens whose K/V are in the cache (the rest still need a forward)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # logical block i -> physical block id
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash of each *full* block
    finish_reason: str | None = None
    # the samples still to split off when the prompt is done (n - 1, then 0)
    pending_forks: int = 0
    # None unless asked for; [None, logprob of prompt token 1, ...] as the prefill computes them
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # speculative decoding: the last this many token_ids are a guess, verified (and cut) within this step
    num_draft_tokens: int = 0
    lora: LoRAAdapter | None = None  # the adapter it runs with (lora.py); None: the base model
    # structured outputs: the grammar's state after this sample's output tokens (structured.py)
    matcher: LLMatcher | None = None

    def __post_init__(self):
        if self.index == 0 and not self.num_output_tokens:
            self.pending_forks = self.params.n - 1
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def prefix_root(self) -> str | None:
        """What its first block's prefix-cache key starts from: its adapter, so that sequences of different
        adapters (whose K/V differ for the same tokens) never share a block (block_manager.py)."""
        return None if self.lora is None else f"lora:{self.lora.uid}"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_slots(self) -> int:
        """Running slots (of max_num_seqs) this sequence takes: its samples to come included."""
        return 1 + self.pending_forks

    @property
    def wants_prompt_logits(self) -> bool:
        """True while some prompt token still lacks its logprob: every prompt position must then run."""
        return (
            self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    # ---- block helpers (nano-vllm style) ------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks its tokens fill (the last one possibly in part)."""
        return -(-self.num_tokens // self.block_size)

    @property
    def num_full_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    def block(self, i: int) -> list[int]:
        """The token ids of logical block i."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]
