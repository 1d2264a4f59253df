"""LLMEngine: requests in, one scheduler step at a time, tokens out. The loop a server drives.

    engine.add_request("a", "It is a truth", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():          # every running request advances by (at most) one token
            ...
One `step()` = schedule (which sequences, how many tokens each) -> one forward pass over all of them ->
sample one token for each sequence whose prompt is fully in the cache -> check stop conditions -> free
the blocks of finished ones. Single-threaded by design: the caller owns it.

A request can also ask for n samples (prefilled once, then forked: the samples share the prompt's blocks),
for the logprob of each generated token, and for the logprobs of its prompt (with max_tokens=0, only
those: a scoring request, what lm-eval's loglikelihood tasks send). The logits rows a step needs are
the sampled positions plus, for such requests, every prompt position (ScheduledChunk says which).

With speculative decoding on (EngineConfig(speculative_ngram=n), speculative.py), a decoding sequence may
feed 1 + k tokens in a step: its pending token and k guessed ones, a short prefill chunk; the step then
keeps the guesses the model agrees with plus one token of its own, and rolls the rest back.

One request cannot take the others down: whatever fails for one request inside `step()` (sampling, its
logprobs, its stop check) finishes that request with finish_reason "error" and frees its blocks; the
rest of the batch carries on. (A failure of the batched forward pass itself is the engine's, and raises.)
"""

import logging
from dataclasses import dataclass
from itertools import count

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import KVShape, PagedKVCache, default_num_blocks
from .model_runner import ModelRunner, check_supported
from .sampling import (
    SamplingParams,
    TokenLogprob,
    is_int,
    request_probabilities,
    sample,
    token_logprobs,
)
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, Status
from .speculative import SpeculativeStats, accept_greedy, accept_sampled, propose_ngram

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


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float  # kv_blocks_used / kv_blocks_total, in 0..1
    num_preemptions: int
    prefix_cache_hit_rate: float  # fraction of full prompt blocks found in the prefix cache
    # speculative decoding (0 when off): tokens drafted, of those accepted, accepted / drafted, and the
    # tokens a verifying step yields on average (accepted + the model's own one)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_acceptance_rate: float = 0.0
    mean_tokens_per_verify_step: float = 0.0
    # the prefix cache since the engine started, in tokens (whole blocks): prompt tokens looked up and found;
    # two counters, so a hit rate over any interval is (hits after - before) / (queries after - before)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, **options):
        """config: an EngineConfig; or its fields as keywords (LLMEngine(model, tok, max_num_seqs=8))."""
        check_supported(model)
        config = self.config = EngineConfig.build(config, **options)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        dtype = config.kv_cache_dtype or next(model.parameters()).dtype
        self.kv_shape = KVShape.of(model)
        self.max_context = self.kv_shape.max_context
        num_blocks = config.num_blocks or default_num_blocks(
            self.kv_shape, dtype, config.block_size, config.max_num_seqs, self.device
        )
        self.block_size = config.block_size
        # one block more than the block manager hands out: the compiled decode step's padding rows write
        # there (compiled_decode.py), so they can never touch a sequence's KV
        self.cache = PagedKVCache(
            self.kv_shape, num_blocks + 1, self.block_size, dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config)
        self.runner = ModelRunner(model, self.cache, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = {eos} if isinstance(eos, int) else set()
        # request id -> its live samples (one until its prompt is prefilled, then up to n)
        self.requests: dict[str, list[Sequence]] = {}
        self._arrivals = count()
        self._pending: list[StepOutput] = []  # aborts, reported by the next step()
        self.num_steps = 0
        # request ids run at each step (for timeline plots); see record_history
        self.history: list[list[str]] = []
        self.record_history = False
        self.speculative = SpeculativeStats()

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(
                f"request id {request_id!r} is already in use by an unfinished request"
            )
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(is_int(t) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a str or a list of token ids (ints)")
        if not ids:
            raise ValueError("prompt is empty: it needs at least one token")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens"
            )
        if (
            self.block_manager.blocks_needed(len(ids) + params.max_tokens)
            > self.block_manager.num_blocks
        ):
            raise ValueError(
                f"this request needs up to {len(ids) + params.max_tokens} tokens of KV cache but the "
                f"whole cache holds {self.block_manager.num_blocks * self.block_size}; "
                f"raise num_blocks or lower max_tokens"
            )
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(
                f"n ({params.n} samples) exceeds max_num_seqs ({self.scheduler.max_num_seqs}), the "
                f"sequences that can run at once; lower n or raise max_num_seqs"
            )
        seq = Sequence(
            request_id,
            ids,
            len(ids),
            params,
            next(self._arrivals),
            generator=self._generator(params, 0),
            block_size=self.block_size,
        )
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Sample `index` of a seeded request draws from its own generator, seeded with seed + index
        (as vLLM does): reproducible, whatever else shares the batch."""
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed + index)

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its samples) now and free its KV blocks; the next step() reports each sample
        with reason "abort"."""
        self._pending += self._finish_request(request_id, "abort")

    def _finish_request(self, request_id: str, reason: str, error: str | None = None):
        """End every live sample of a request; one finished StepOutput per sample not yet finished."""
        outputs = []
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

    def warm_up(self) -> dict[int, float]:
        """Compile the decode step for every padded batch size now (vLLM and SGLang do this at start-up), so
        that no request waits for a compilation. Returns seconds per size ({} with enforce_eager)."""
        return self.runner.compiled.warm_up() if self.runner.compiled else {}

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            bm.num_used,
            bm.num_blocks,
            bm.num_used / bm.num_blocks,
            self.scheduler.num_preemptions,
            bm.prefix_cache_hit_rate,
            self.speculative.num_draft_tokens,
            self.speculative.num_accepted_tokens,
            self.speculative.acceptance_rate,
            self.speculative.mean_tokens_per_step,
            bm.cache_queries * bm.block_size,
            bm.cache_hits * bm.block_size,
        )

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        if self.config.speculative_ngram:
            self._draft()
        chunks = self.scheduler.schedule()
        if self.config.speculative_ngram:
            scheduled = {c.seq for c in chunks}
            for seq in self.scheduler.running + list(self.scheduler.waiting):
                if seq.num_draft_tokens and seq not in scheduled:  # preempted: its guess goes too
                    self._drop_draft(seq)
        if not chunks:
            return outputs
        self.num_steps += 1
        if self.record_history:
            self.history.append([c.seq.request_id for c in chunks])
        self.cache.copy_blocks(self.block_manager.take_copies())
        step = self.runner.prepare(chunks)  # lays out the logits rows: step.rows, one per chunk
        logits = self.runner.run(step)
        draws: list[tuple[Sequence, int]] = []  # (sample, its logits row): what to sample this step
        verifies: list[
            tuple[Sequence, int]
        ] = []  # (sequence, its first logits row): drafts to check
        for chunk, rows in zip(chunks, step.rows):
            seq = chunk.seq
            if seq.status is Status.FINISHED:  # its request failed earlier in this step
                continue
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.num_draft:  # its blocks are named once the rejected tokens are rolled back
                verifies.append((seq, rows.sampled.start))
                continue
            self.block_manager.register_full_blocks(seq)
            try:
                if rows.scored.stop > rows.scored.start:
                    self._record_prompt_logprobs(seq, chunk, logits[rows.scored])
                if chunk.samples:
                    draws += [(s, rows.sampled.start) for s in self._fork(seq)]
                elif chunk.completes:  # a scoring-only request (max_tokens=0): done
                    outputs += self._finish_scoring(seq)
            except Exception as e:
                outputs += self._fail(seq, "scoring its prompt", e)
        for (seq, row), token in zip(draws, self._sample(logits, draws)):
            if seq.status is Status.FINISHED:  # its request failed earlier in this step
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                outputs.append(self._advance(seq, token, logits[row : row + 1]))
            except Exception as e:
                outputs += self._fail(seq, "sampling its next token", e)
        for seq, row in verifies:
            if seq.status is Status.FINISHED:
                continue
            try:
                outputs.append(self._verify(seq, logits[row : row + 1 + seq.num_draft_tokens]))
            except Exception as e:
                outputs += self._fail(seq, "verifying its drafted tokens", e)
        return outputs

    # ---- speculative decoding (speculative.py) ------------------------------------------------------
    def _draft(self) -> None:
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
            if not decoding or seq.pending_forks or k <= 0:
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

    def _drop_draft(self, seq: Sequence) -> None:
        del seq.token_ids[seq.num_tokens - seq.num_draft_tokens :]
        seq.num_draft_tokens = 0

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        """logits [1 + k, V] at the positions of the pending token and the k drafted ones. Keep what the
        acceptance rule accepts plus one token of the model's own, roll the KV cache back past them."""
        num_draft = seq.num_draft_tokens
        draft = seq.token_ids[seq.num_tokens - num_draft :]
        if seq.params.greedy:
            tokens = accept_greedy(draft, logits.argmax(dim=-1).tolist())
        else:
            probs = request_probabilities(logits, seq.params)
            tokens = accept_sampled(draft, probs, seq.generator or self.generator)
        self.speculative.record(num_draft, len(tokens) - 1)
        self._drop_draft(seq)
        # the KV of the accepted drafts stays; the slots (and whole blocks) past them are given back
        self.block_manager.truncate(seq, seq.num_tokens + len(tokens) - 1)
        outputs = []
        for i, token in enumerate(
            tokens
        ):  # one at a time: a stop token or max_tokens may end it early
            outputs.append(self._advance(seq, token, logits[i : i + 1]))
            if outputs[-1].finished:
                break
        if seq.status is not Status.FINISHED:
            self.block_manager.register_full_blocks(seq)
        return merge_outputs(outputs)

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
                generator=self._generator(seq.params, index),
                block_size=self.block_size,
                index=index,
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
        rows = logits if index == list(range(len(logits))) else logits[index]
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

    def _advance(self, seq: Sequence, token: int, logits: torch.Tensor) -> StepOutput:
        """Append a sampled token (logits [1, V]: what it was sampled from) and check the stop conditions."""
        seq.token_ids.append(token)
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

    def _fail(self, seq: Sequence, doing: str, error: Exception) -> list[StepOutput]:
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
        return self._finish_request(seq.request_id, "error", message)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
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

    # ---- convenience -------------------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, list[int]]:
        """Step until idle; returns request id -> generated token ids (the offline `LLM.generate` loop)."""
        done: dict[str, list[int]] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.index == 0:
                    done.setdefault(out.request_id, []).extend(out.new_token_ids)
        return done


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
