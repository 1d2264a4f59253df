"""After the forward pass: logits rows in, tokens and StepOutputs out.

A step's forward pass is the same for every request; what follows is not. Each chunk's logits rows mean
something different: prompt positions to score (prompt_logprobs), a row to sample the next token from (for
each of n samples, forked the first time), or, for a scoring-only request (max_tokens=0), nothing more to do.
Each new token is appended and checked against the stop conditions, and a request that fails along the way
is finished alone. All of that lives here, so that `LLMEngine.step` reads as schedule -> forward -> process
(engine.py), and speculative decoding's verify (speculative.py) appends its tokens the same way (`advance`).

One request cannot take the others down: whatever fails for one request here (sampling, its logprobs, its
stop check) finishes that request with finish_reason "error" and frees its blocks; the rest carry on.
"""

import logging
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .model_runner import ChunkRows
from .sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, Status
from .structured import apply_token_bitmask, fill_bitmask

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None (still running)
    num_prompt_tokens: int
    num_output_tokens: int
    index: int = 0  # which of the request's n samples (each finishes on its own)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    # once, in the first output of sample 0, when asked for (the first prompt token has None)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # finish_reason "error": what went wrong, safe to show a client


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """One StepOutput for the several tokens one sequence produced in a step (speculative decoding)."""
    first, last = outputs[0], outputs[-1]
    logprobs = None
    if first.logprobs is not None:
        logprobs = [lp for out in outputs for lp in out.logprobs or []]
    return StepOutput(
        last.request_id,
        [t for out in outputs for t in out.new_token_ids],
        last.finished,
        last.finish_reason,
        last.num_prompt_tokens,
        last.num_output_tokens,
        index=last.index,
        logprobs=logprobs,
        prompt_logprobs=first.prompt_logprobs,
    )


class OutputProcessor:
    """Turns a step's logits into each request's tokens and StepOutputs; owns the unseeded generator."""

    def __init__(
        self,
        scheduler: Scheduler,
        block_manager: BlockManager,
        requests: dict[str, list[Sequence]],
        tokenizer,
        device: torch.device,
        seed: int,
    ):
        """requests: the engine's request id -> live samples (shared: forks join it, finishes leave it)."""
        self.scheduler, self.block_manager, self.requests = scheduler, block_manager, requests
        self.tokenizer, self.device = tokenizer, device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for unseeded requests
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = {eos} if isinstance(eos, int) else set()

    def process(
        self, chunks: list[ScheduledChunk], rows: list[ChunkRows], logits: torch.Tensor
    ) -> list[StepOutput]:
        """Each chunk's rows of `logits` (ModelRunner.prepare laid them out): score its prompt positions,
        then sample one token per sample. Chunks with drafted tokens are left to the Speculator's verify."""
        outputs: list[StepOutput] = []
        draws: list[tuple[Sequence, int]] = []  # (sample, its logits row): what to sample this step
        for chunk, chunk_rows in zip(chunks, rows):
            seq = chunk.seq
            if seq.status is Status.FINISHED:  # its request failed earlier in this step
                continue
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.num_draft:  # its blocks are named once the rejected tokens are rolled back
                continue
            self.block_manager.register_full_blocks(seq)
            try:
                if chunk_rows.scored.stop > chunk_rows.scored.start:
                    self._record_prompt_logprobs(seq, chunk, logits[chunk_rows.scored])
                if chunk.samples:
                    draws += [(s, chunk_rows.sampled.start) for s in self._fork(seq)]
                elif chunk.completes:  # a scoring-only request (max_tokens=0): done
                    outputs += self._finish_scoring(seq)
            except Exception as e:
                outputs += self.fail(seq, "scoring its prompt", e)
        for (seq, row), token in zip(draws, self._sample(logits, draws)):
            if seq.status is Status.FINISHED:  # its request failed earlier in this step
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                outputs.append(self.advance(seq, token, logits[row : row + 1]))
            except Exception as e:
                outputs += self.fail(seq, "sampling its next token", e)
        return outputs

    def generator_for(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Sample `index` of a seeded request draws from its own generator, seeded with seed + index
        (as vLLM does): reproducible, whatever else shares the batch."""
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed + index)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The samples drawing from this sequence's logits: itself, plus, the first time a request for
        n > 1 samples gets here (its prompt is in the cache), n - 1 new sequences sharing its blocks."""
        samples = [seq]
        for index in range(1, seq.pending_forks + 1):
            child = Sequence(
                seq.request_id,
                list(seq.token_ids),
                seq.num_prompt_tokens,
                seq.params,
                seq.arrival,
                generator=self.generator_for(seq.params, index),
                block_size=self.block_manager.block_size,
                index=index,
                lora=seq.lora,
                matcher=seq.matcher.deep_copy() if seq.matcher is not None else None,
            )
            self.scheduler.fork(seq, child)
            self.requests[seq.request_id].append(child)
            samples.append(child)
        seq.pending_forks = 0
        return samples

    def _sample(
        self, logits: torch.Tensor, draws: list[tuple[Sequence, int]]
    ) -> list[int | Exception]:
        """One token per draw, sampled together; if that fails, each draw alone, so that only the
        failing ones get an exception instead of a token."""
        if not draws:
            return []
        index = [r for _, r in draws]
        # the common step (one sample per row, in order) needs no gather
        shared = index == list(range(len(logits)))
        rows = logits if shared else logits[index]
        rows = self._constrain(rows, [s for s, _ in draws], shared)
        params, gens = [s.params for s, _ in draws], [s.generator for s, _ in draws]
        tokens: list[int | Exception] = []
        try:
            tokens += sample(rows, params, gens, self.generator)
        except Exception:
            for i in range(len(draws)):
                try:
                    tokens += sample(
                        rows[i : i + 1], params[i : i + 1], gens[i : i + 1], self.generator
                    )
                except Exception as e:
                    tokens.append(e)
        return tokens

    @staticmethod
    def _constrain(rows: torch.Tensor, samples: list[Sequence], shared: bool) -> torch.Tensor:
        """rows [B, V] with each constrained sample's disallowed tokens at -inf. In place, unless `shared`
        (rows is the step's logits itself) and a constrained sample wants logprobs, which are reported
        from the raw logits: then on a copy. Only the constrained rows' bitmasks are filled: an
        unconstrained batch pays nothing."""
        constrained = [i for i, s in enumerate(samples) if s.matcher is not None]
        if not constrained:
            return rows
        matchers = [m for s in samples if (m := s.matcher) is not None]
        bitmask = fill_bitmask(matchers, rows.shape[-1])
        if shared and any(samples[i].params.logprobs is not None for i in constrained):
            rows = rows.clone()
        if len(constrained) == len(samples):
            return apply_token_bitmask(rows, bitmask)
        with torch.inference_mode():
            rows[constrained] = apply_token_bitmask(rows[constrained], bitmask)
        return rows

    def advance(self, seq: Sequence, token: int, logits: torch.Tensor) -> StepOutput:
        """Append a sampled token (logits [1, V]: what it was sampled from) and check the stop conditions."""
        seq.token_ids.append(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            raise ValueError(f"the grammar refused the sampled token: {seq.matcher.get_error()}")
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = token_logprobs(logits, [token], seq.params.logprobs)
        first_of_request = seq.index == 0 and seq.num_output_tokens == 1
        reason = self._finish_reason(seq, token)
        if reason:
            self._finish_sample(seq, reason)
        return StepOutput(
            seq.request_id,
            [token],
            reason is not None,
            reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            index=seq.index,
            logprobs=logprobs,
            prompt_logprobs=seq.prompt_logprobs if first_of_request else None,
        )

    def _finish_sample(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        samples = self.requests[seq.request_id]
        samples.remove(seq)
        if not samples:
            del self.requests[seq.request_id]

    def _record_prompt_logprobs(self, seq: Sequence, chunk: ScheduledChunk, logits: torch.Tensor):
        """logits [len(positions), V] at this chunk's prompt-logprob positions: position p scores p + 1."""
        recorded, k = seq.prompt_logprobs, seq.params.prompt_logprobs
        # a chunk has prompt-logprob positions only for a sequence that asked for them
        assert recorded is not None and k is not None
        positions = chunk.prompt_logprob_positions
        targets = seq.token_ids[positions.start + 1 : positions.stop + 1]
        recorded += token_logprobs(logits, targets, k)

    def _finish_scoring(self, seq: Sequence) -> list[StepOutput]:
        """A max_tokens=0 request is done once its prompt is scored: one output per sample."""
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq, "length")
        return [
            StepOutput(
                seq.request_id,
                [],
                True,
                "length",
                seq.num_prompt_tokens,
                0,
                index=index,
                prompt_logprobs=seq.prompt_logprobs if index == 0 else None,
            )
            for index in range(seq.num_slots)
        ]

    def fail(self, seq: Sequence, doing: str, error: Exception) -> list[StepOutput]:
        """Finish the request whose processing raised `error`, with a message safe for its client (the
        details, traceback included, go to the log)."""
        log.error(
            "request %s failed while %s; it is finished with reason 'error'",
            seq.request_id,
            doing,
            exc_info=error,
        )
        message = (
            f"the engine failed while {doing} ({type(error).__name__}); this request was stopped, "
            "the others continue"
        )
        return self.finish_request(seq.request_id, "error", message)

    def finish_request(
        self, request_id: str, reason: str, error: str | None = None
    ) -> list[StepOutput]:
        """End every live sample of a request; one finished StepOutput per sample not yet finished."""
        outputs: list[StepOutput] = []
        for seq in self.requests.pop(request_id, []):
            self.scheduler.finish(seq, reason)
            # a sequence that has not forked yet stands for its samples to come, too
            for index in range(seq.index, seq.index + seq.num_slots):
                outputs.append(
                    StepOutput(
                        request_id,
                        [],
                        True,
                        reason,
                        seq.num_prompt_tokens,
                        seq.num_output_tokens,
                        index=index,
                        error=error,
                    )
                )
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar admits nothing more
            return "stop"
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop"
        if p.stop:
            # a stop string that ends at this token lies in the last few tokens (every token is at least one
            # byte, a character at most four): decode that tail, not the whole output again at every step
            window = 4 * max(len(s) for s in p.stop) + 4
            tail = self.tokenizer.decode(seq.output_token_ids[-window:], skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                return "stop"
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        return None
