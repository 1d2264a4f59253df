"""LLMEngine: requests in, one scheduler step at a time, tokens out. The loop a server drives.

    engine.add_request("a", "It is a truth", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():          # every running request advances by (at most) one token
            ...
One `step()` = schedule (which sequences, how many tokens each) -> one forward pass over all of them ->
sample one token for each sequence whose prompt is fully in the cache -> check stop conditions -> free
the blocks of finished ones. Single-threaded by design: the caller owns it.
"""

from dataclasses import dataclass
from itertools import count

import torch

from .block_manager import BlockManager
from .kv_cache import KVShape, PagedKVCache, default_num_blocks, kv_bytes_per_token
from .model_runner import ModelRunner, check_supported
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None (still running)
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float  # kv_blocks_used / kv_blocks_total, in 0..1
    num_preemptions: int
    prefix_cache_hit_rate: float  # fraction of full prompt blocks found in the prefix cache


class LLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        kv_cache_dtype: torch.dtype | None = None,
    ):
        check_supported(model)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(
                f"num_blocks must be None (sized from a memory budget) or an int >= 1, got {num_blocks!r}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        dtype = kv_cache_dtype or next(model.parameters()).dtype
        self.kv_shape = KVShape.of(model)
        self.max_context = self.kv_shape.max_context
        if num_blocks is None:
            num_blocks = default_num_blocks(
                self.kv_shape, dtype, block_size, max_num_seqs, self.device
            )
        self.block_size = block_size
        self.cache = PagedKVCache(self.kv_shape, num_blocks, block_size, dtype, self.device)
        self.kv_bytes_per_token = kv_bytes_per_token(self.kv_shape, dtype)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = {eos} if isinstance(eos, int) else set()
        self.requests: dict[str, Sequence] = {}
        self._arrivals = count()
        self._pending: list[StepOutput] = []  # aborts, reported by the next step()
        self.num_steps = 0
        self.history: list[
            list[str]
        ] = []  # request ids run at each step (for timeline plots); see record_history
        self.record_history = False

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
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
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
        gen = (
            torch.Generator(device=self.device).manual_seed(params.seed)
            if params.seed is not None
            else None
        )
        seq = Sequence(request_id, ids, len(ids), params, next(self._arrivals), generator=gen)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; the next step() reports it with reason "abort"."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq, "abort")
        self._pending.append(
            StepOutput(request_id, [], True, "abort", seq.num_prompt_tokens, seq.num_output_tokens)
        )

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
        )

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        self.num_steps += 1
        if self.record_history:
            self.history.append([c.seq.request_id for c in chunks])
        completes = [c.completes for c in chunks]
        inputs = self.runner.prepare(
            [
                (
                    c.seq.token_ids[
                        c.seq.num_computed_tokens : c.seq.num_computed_tokens + c.num_tokens
                    ],
                    c.seq.num_computed_tokens,
                    c.seq.block_table,
                )
                for c in chunks
            ],
            completes,
        )
        logits = self.runner.forward(inputs)
        sampling = [c.seq for c, done in zip(chunks, completes) if done]
        new_tokens = (
            sample(
                logits,
                [s.params for s in sampling],
                [s.generator for s in sampling],
                self.generator,
            )
            if sampling
            else []
        )
        for c in chunks:
            c.seq.num_computed_tokens += c.num_tokens
            self.block_manager.register_full_blocks(c.seq)
        for seq, token in zip(sampling, new_tokens):
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
            outputs.append(
                StepOutput(
                    seq.request_id,
                    [token],
                    reason is not None,
                    reason,
                    seq.num_prompt_tokens,
                    seq.num_output_tokens,
                )
            )
        return outputs

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
                done.setdefault(out.request_id, []).extend(out.new_token_ids)
        return done
