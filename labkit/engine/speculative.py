"""Speculative decoding with prompt lookup: guess the next k tokens for free, check them in one forward pass.

Decoding one token is memory-bound: every step streams all the weights (and the KV cache) through the
processor to do a few FLOPs per byte. Feeding 1 + k tokens in that same step costs about the same time,
so if we can *guess* what comes next, the model can check k guesses for the price of one step.

The guesser here needs no second model (prompt lookup, "n-gram" drafting, as vLLM's `ngram` method): find
the last n tokens of the sequence (prompt + output) earlier in the sequence and propose the k tokens that
followed them there. It shines when the output copies the input - quoting, summarising, editing code.

Verification (one step, a short "prefill chunk" of 1 + k tokens through the paged-KV runner) gives the
target's distribution p_i at each of the k + 1 positions; then:
- greedy: keep the longest prefix where draft[i] == argmax p_i, then the target's own argmax at the first
  mismatch (or after the last draft). Exactly the tokens plain greedy decoding would produce, 1..k+1 a step.
- temperature > 0: speculative sampling's rejection rule (Leviathan et al. 2023; Chen et al. 2023): accept
  draft token x with probability min(1, p(x) / q(x)); at the first rejection draw from the residual
  max(0, p - q), renormalised; if all k pass, draw one more from p_k. Our draft is deterministic, so its
  distribution q is a point mass on x: accept with probability p(x), and on rejection sample from p with x
  removed, renormalised. Every emitted token is then distributed exactly as plain sampling from p.
The engine then rolls back the rejected tokens: their KV slots are simply forgotten (the sequence's
computed length shrinks) and blocks past the kept tokens go back to the free list (BlockManager.truncate).

The Speculator does both halves for the engine: `draft` before the schedule (a drafting sequence feeds
1 + k tokens in the step, a short prefill chunk), `verify` after the forward pass.
"""

from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .model_runner import ChunkRows
from .outputs import OutputProcessor, StepOutput, merge_outputs
from .sampling import request_probabilities
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, Status


def propose_ngram(token_ids: list[int], k: int, max_n: int, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the sequence's last n tokens,
    trying the longest n first (max_n down to min_n). [] when nothing matches."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n :]
        # the latest start first: a copy in progress is usually the closest match
        for start in range(length - n - 1, -1, -1):
            if token_ids[start : start + n] == suffix:
                return token_ids[start + n : start + n + k]
    return []


def accept_greedy(draft: list[int], target: list[int]) -> list[int]:
    """target: the argmax at each of the len(draft) + 1 verified positions. Returns the tokens to emit: the
    drafted ones that match, then the target's own token (so always 1 .. len(draft) + 1 tokens)."""
    assert len(target) == len(draft) + 1, "one target token per draft token, plus the next one"
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return draft[:accepted] + [target[accepted]]


def accept_sampled(
    draft: list[int], probs: torch.Tensor, generator: torch.Generator | None = None
) -> list[int]:
    """probs [len(draft) + 1, V]: the target's sampling distribution (temperature, top-k, top-p applied) at
    each verified position. The rejection rule for a point-mass draft: keep draft[i] with probability
    p_i(draft[i]); at the first rejection, emit a token from p_i without draft[i], renormalised, and stop; if
    all are kept, emit one more token from p_k."""
    assert probs.shape[0] == len(draft) + 1, "one distribution per draft token, plus the next one"
    out: list[int] = []
    for i, x in enumerate(draft):
        u = torch.rand((), generator=generator, device=probs.device)
        if u < probs[i, x]:
            out.append(x)
            continue
        residual = probs[i].clone()
        residual[x] = 0  # p - q with q the point mass on x, clipped at 0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[-1], 1, generator=generator)))
    return out


@dataclass
class SpeculativeStats:
    """What speculation bought: drafted and accepted tokens, over `num_verify_steps` sequence-steps."""

    num_draft_tokens: int = 0  # tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, kept
    num_verify_steps: int = 0  # (sequence, step) pairs that verified at least one drafted token
    num_emitted_tokens: int = (
        0  # tokens those steps produced (accepted + the target's own one each)
    )

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens a verifying step yields on average (1 = speculation bought nothing)."""
        return self.num_emitted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        self.num_verify_steps += 1
        self.num_emitted_tokens += num_accepted + 1


class Speculator:
    """Prompt-lookup drafts for the decoding sequences, and their verification, for LLMEngine.step."""

    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        block_manager: BlockManager,
        outputs: OutputProcessor,
    ):
        """outputs: appends the kept tokens as plain decoding would (stop checks, logprobs, failures)."""
        self.config, self.scheduler, self.block_manager = config, scheduler, block_manager
        self.outputs = outputs
        self.stats = SpeculativeStats()

    def draft(self) -> None:
        """Append a prompt-lookup guess to each decoding sequence, within this step's token budget and the
        free blocks (a guess never preempts anyone), and never past the request's max_tokens."""
        running = self.scheduler.running
        budget = self.config.max_num_batched_tokens - sum(
            s.num_tokens - s.num_computed_tokens for s in running
        )
        bm = self.block_manager
        spare_blocks = bm.num_free - len(running)  # keep one for each sequence's own next token
        for seq in running:
            decoding = seq.num_output_tokens > 0 and seq.num_computed_tokens == seq.num_tokens - 1
            k = min(
                self.config.num_speculative_tokens,
                seq.params.max_tokens - seq.num_output_tokens - 1,
                budget,
            )
            # (a constrained sequence is not drafted for: a guess its grammar forbids would need the
            # matcher rolled back; it decodes one token a step)
            if not decoding or seq.pending_forks or k <= 0 or seq.matcher is not None:
                continue
            draft = propose_ngram(seq.token_ids, k, self.config.speculative_ngram)
            grow = bm.blocks_needed(seq.num_tokens + len(draft)) - bm.blocks_needed(seq.num_tokens)
            while draft and grow > spare_blocks:
                draft.pop()
                grow = bm.blocks_needed(seq.num_tokens + len(draft)) - bm.blocks_needed(
                    seq.num_tokens
                )
            if draft:
                spare_blocks -= grow
                budget -= len(draft)
                seq.token_ids += draft
                seq.num_draft_tokens = len(draft)

    def drop_unscheduled(self, chunks: list[ScheduledChunk]) -> None:
        """A drafting sequence the schedule left out (preempted) loses its guess: it is drafted anew."""
        scheduled = {c.seq for c in chunks}
        for seq in self.scheduler.running + list(self.scheduler.waiting):
            if seq.num_draft_tokens and seq not in scheduled:
                self._drop(seq)

    def _drop(self, seq: Sequence) -> None:
        del seq.token_ids[seq.num_tokens - seq.num_draft_tokens :]
        seq.num_draft_tokens = 0

    def verify(
        self, chunks: list[ScheduledChunk], rows: list[ChunkRows], logits: torch.Tensor
    ) -> list[StepOutput]:
        """One StepOutput per drafting sequence still running: its kept tokens (after the plain samples,
        which OutputProcessor.process drew first)."""
        outputs: list[StepOutput] = []
        for chunk, chunk_rows in zip(chunks, rows):
            seq, row = chunk.seq, chunk_rows.sampled.start
            if not chunk.num_draft or seq.status is Status.FINISHED:
                continue
            try:
                outputs.append(self.accept(seq, logits[row : row + 1 + seq.num_draft_tokens]))
            except Exception as e:
                outputs += self.outputs.fail(seq, "verifying its drafted tokens", e)
        return outputs

    def accept(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        """logits [1 + k, V] at the positions of the pending token and the k drafted ones. Keep what the
        acceptance rule accepts plus one token of the model's own, roll the KV cache back past them."""
        num_draft = seq.num_draft_tokens
        draft = seq.token_ids[seq.num_tokens - num_draft :]
        if seq.params.greedy:
            tokens = accept_greedy(draft, logits.argmax(dim=-1).tolist())
        else:
            probs = request_probabilities(logits, seq.params)
            tokens = accept_sampled(draft, probs, seq.generator or self.outputs.generator)
        self.stats.record(num_draft, len(tokens) - 1)
        self._drop(seq)
        # the KV of the accepted drafts stays; the slots (and whole blocks) past them are given back
        self.block_manager.truncate(seq, seq.num_tokens + len(tokens) - 1)
        outputs = []
        for i, token in enumerate(
            tokens
        ):  # one at a time: a stop token or max_tokens may end it early
            outputs.append(self.outputs.advance(seq, token, logits[i : i + 1]))
            if outputs[-1].finished:
                break
        if seq.status is not Status.FINISHED:
            self.block_manager.register_full_blocks(seq)
        return merge_outputs(outputs)
