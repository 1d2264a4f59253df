"""Continuous batching: decide, every step, which sequences run and how many tokens each feeds in.

Every step has a budget of `max_num_batched_tokens` tokens and `max_num_seqs` sequences.
1. Running sequences go first, oldest first: each feeds its next token (decode) or the next chunk of a
   prompt that did not fit in one step (chunked prefill). If the KV cache has no block for it, the
   *newest* running sequence is preempted: its blocks are freed and it goes back to the front of the
   queue, to be recomputed later (vLLM's default "recompute" preemption; the prefix cache often makes
   the recompute cheap).
2. Then waiting sequences are admitted in arrival order (FIFO) while budget and free blocks last. A
   sequence that does not fit blocks the ones behind it - no overtaking, so nobody starves.
So a finished request's slot is refilled on the very next step: that is the whole trick.
"""

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens

    @property
    def completes(self) -> bool:
        """True if this chunk reaches the last known token, so the step produces the next one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, "
                f"got {max_num_seqs}, {max_num_batched_tokens}"
            )
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            while not self.blocks.can_append(seq, end):
                victim = next(s for s in reversed(self.running) if s.request_id not in scheduled)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.append(seq, end)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.request_id)
            budget -= n
        # admit new work only if nobody had to be preempted (otherwise we would just thrash)
        while (
            self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)  # may start with num_computed_tokens > 0 (prefix-cache hit)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.request_id)
            budget -= n
        return chunks

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
