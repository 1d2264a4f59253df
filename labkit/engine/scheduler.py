"""Continuous batching: decide, every step, which sequences run and how many tokens each feeds in.

Every step has a budget of `max_num_batched_tokens` tokens and `max_num_seqs` sequences.
1. Running sequences go first, oldest first: each feeds its next token (decode) or the next chunk of a
   prompt that did not fit in one step (chunked prefill). If the KV cache has no block for it, the
   *newest* running sequence is preempted: its blocks are freed and it goes back to the front of the
   queue, to be recomputed later (vLLM's default "recompute" preemption; the prefix cache often makes
   the recompute cheap).
2. Then waiting sequences are admitted in arrival order (FIFO) while budget and free blocks last. A
   sequence that does not fit blocks the ones behind it - no overtaking, so nobody starves. A request
   for n samples takes n of the `max_num_seqs` slots from admission on: it forks into n sequences when
   its prompt is done (`fork`), and each of them is scheduled (and preempted) on its own from then on.
So a finished request's slot is refilled on the very next step: that is the whole trick.
With LoRA adapters (lora_slots.py), a running sequence also holds its adapter's slot: a waiting sequence
whose adapter has no slot and cannot get one waits, in order, like one waiting for KV blocks.
"""

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .lora_slots import LoRASlots
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    """One sequence's share of a step: `num_tokens` tokens from position `start` (a snapshot taken when
    scheduled; the engine advances the sequence after the forward pass)."""

    seq: Sequence
    num_tokens: int
    start: int = field(init=False)
    completes: bool = field(
        init=False
    )  # reaches the last known token: the step yields the next one
    num_draft: int = field(
        init=False
    )  # speculative tokens at its end, each position's logits verify one

    def __post_init__(self):
        self.start = self.seq.num_computed_tokens
        self.completes = self.start + self.num_tokens == self.seq.num_tokens
        self.num_draft = self.seq.num_draft_tokens if self.completes else 0

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]

    @property
    def samples(self) -> bool:
        """Does the step sample a token for this sequence? (Not for a scoring-only request.)"""
        return self.completes and self.seq.params.max_tokens > 0

    @property
    def num_sampling_rows(self) -> int:
        """Logits rows the step samples (or verifies) from, at the chunk's end: 1 + its drafted tokens."""
        return 1 + self.num_draft if self.samples else 0

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions whose logits give a prompt token's logprob not yet recorded (position p scores
        token p + 1; the prompt's last position predicts the first generated token, not a prompt one)."""
        recorded = self.seq.prompt_logprobs
        if recorded is None or not self.seq.wants_prompt_logits:
            return range(0)
        first = max(self.start, len(recorded) - 1)
        return range(first, min(self.start + self.num_tokens, self.seq.num_prompt_tokens - 1))


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        config: EngineConfig | None = None,
        loras: LoRASlots | None = None,
        **options,
    ):
        """config: the engine's EngineConfig, or its fields as keywords (max_num_seqs=8, ...); loras: the
        adapter slots running sequences hold (None: LoRA off)."""
        config = EngineConfig.build(config, **options)
        self.blocks, self.loras = block_manager, loras
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child`, a new sample of `parent`'s request, sharing its blocks (parallel sampling)."""
        self.blocks.fork(parent, child)
        self._start_running(child)

    def _start_running(self, seq: Sequence) -> None:
        if seq.lora is not None and self.loras is not None:
            self.loras.acquire(seq.lora)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.lora is not None and self.loras is not None:
            self.loras.release(seq.lora)

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[Sequence] = set()
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            while not self.blocks.can_append(seq, end):
                victim = next(s for s in reversed(self.running) if s not in scheduled)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.append(seq, end)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq)
            budget -= n
        # admit new work only if nobody had to be preempted (otherwise we would just thrash)
        # (a request for n samples takes n slots: it forks when its prompt is done)
        slots = sum(s.num_slots for s in self.running)
        while self.waiting and not preempted and budget > 0:
            seq = self.waiting[0]
            if slots + seq.num_slots > self.max_num_seqs:
                break
            if seq.lora is not None and self.loras and not self.loras.can_acquire(seq.lora):
                break  # every adapter slot is held by running sequences of other adapters
            cached = self.blocks.cached_prefix(seq)  # looked up once per admission
            if not self.blocks.can_allocate(seq, cached):
                break
            self.waiting.popleft()
            self.blocks.allocate(
                seq, cached
            )  # may start with num_computed_tokens > 0 (a cache hit)
            self._start_running(seq)
            slots += seq.num_slots
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq)
            budget -= n
        return chunks

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self._stop_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
