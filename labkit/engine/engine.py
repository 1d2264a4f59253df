"""LLMEngine: requests in, one scheduler step at a time, tokens out. The loop a server drives.

    engine.add_request("a", "It is a truth", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():          # every running request advances by (at most) one token
            ...
One `step()` = schedule (which sequences, how many tokens each) -> one forward pass over all of them ->
sample one token for each sequence whose prompt is fully in the cache -> check stop conditions -> free
the blocks of finished ones (all that follows the forward pass is outputs.py's OutputProcessor).
Single-threaded by design: the caller owns it.

A request can also ask for n samples (prefilled once, then forked: the samples share the prompt's blocks),
for the logprob of each generated token, and for the logprobs of its prompt (with max_tokens=0, only
those: a scoring request, what lm-eval's loglikelihood tasks send). The logits rows a step needs are
the sampled positions plus, for such requests, every prompt position (ScheduledChunk says which).

With speculative decoding on (EngineConfig(speculative_ngram=n), speculative.py's Speculator), a decoding
sequence may feed 1 + k tokens in a step: its pending token and k guessed ones, a short prefill chunk; the
step then keeps the guesses the model agrees with plus one token of its own, and rolls the rest back.

A request may constrain its output (SamplingParams.structured_outputs: a JSON schema, a regex, a choice,
a grammar; structured.py): its grammar is compiled (or found in the cache) in `add_request`, so a schema
the library cannot enforce is a ValueError there; each of its samples then carries a matcher that masks
its logits row before sampling, whichever path (eager or compiled) produced the row. Speculative decoding
leaves constrained sequences alone: they decode one token a step.

One request cannot take the others down: whatever fails for one request inside `step()` (sampling, its
logprobs, its stop check) finishes that request with finish_reason "error" and frees its blocks; the
rest of the batch carries on (outputs.py). (A failure of the batched forward pass itself is the engine's,
and raises.)

With EngineConfig(enable_lora=True), adapters are registered at run time (`add_lora(name, path)`, a peft
directory, checked against the model: lora.py) and a request may name one (`add_request(..., lora=name)`);
requests of any adapters and of the base model share every step (lora_slots.py, model_runner.py).
"""

from dataclasses import dataclass
from itertools import count

from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import KVShape, default_num_blocks
from .kv_quant import bytes_per_token, make_cache
from .lora import BaseShapes, LoRAAdapter, LoRAError
from .lora_slots import LoRASlots
from .model_runner import ModelRunner, check_supported
from .outputs import OutputProcessor, StepOutput
from .sampling import SamplingParams, is_int
from .scheduler import Scheduler
from .sequence import Sequence
from .speculative import Speculator
from .structured import GrammarCache


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
        model_dtype = next(model.parameters()).dtype
        self.kv_shape = KVShape.of(model)
        self.max_context = self.kv_shape.max_context
        per_token = bytes_per_token(self.kv_shape, config.kv_cache_dtype, model_dtype)
        num_blocks = config.num_blocks or default_num_blocks(
            self.kv_shape, per_token, config.block_size, config.max_num_seqs, self.device
        )
        self.block_size = config.block_size
        # one block more than the block manager hands out: the compiled decode step's padding rows write
        # there (compiled_decode.py), so they can never touch a sequence's KV
        self.cache = make_cache(
            self.kv_shape,
            num_blocks + 1,
            self.block_size,
            config.kv_cache_dtype,
            model_dtype,
            self.device,
        )
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.lora_base = BaseShapes.of(model)
        self.loras = None  # the adapter slots, with enable_lora
        if config.enable_lora:
            self.loras = LoRASlots(
                self.lora_base, config.max_loras, config.max_lora_rank, model_dtype, self.device
            )
        self.adapters: dict[str, LoRAAdapter] = {}  # registered by name (add_lora)
        self.scheduler = Scheduler(self.block_manager, config, loras=self.loras)
        self.runner = ModelRunner(model, self.cache, config, loras=self.loras)
        # request id -> its live samples (one until its prompt is prefilled, then up to n)
        self.requests: dict[str, list[Sequence]] = {}
        self.processor = OutputProcessor(
            self.scheduler, self.block_manager, self.requests, tokenizer, self.device, config.seed
        )
        # compiled grammars by spec, for requests with structured outputs
        self.grammars = GrammarCache(tokenizer, model.config.vocab_size)
        self.speculator = Speculator(config, self.scheduler, self.block_manager, self.processor)
        self._arrivals = count()
        self._pending: list[StepOutput] = []  # aborts, reported by the next step()
        self.num_steps = 0
        # request ids run at each step (for timeline plots); see record_history
        self.history: list[list[str]] = []
        self.record_history = False

    # ---- adapters ----------------------------------------------------------------------------------
    def add_lora(self, name: str, path) -> LoRAAdapter:
        """Register the peft LoRA adapter at `path` under `name` (replacing one of that name: requests
        already added keep the old one). LoRAError if it does not fit this model or cannot be read."""
        if self.loras is None:
            raise LoRAError("LoRA is off: build the engine with enable_lora=True (--enable-lora)")
        if not isinstance(name, str) or not name:
            raise LoRAError(f"an adapter's name must be a non-empty str, got {name!r}")
        adapter = LoRAAdapter.load(name, path, self.lora_base, self.config.max_lora_rank)
        self.remove_lora(name)
        self.adapters[name] = adapter
        return adapter

    def remove_lora(self, name: str) -> bool:
        """Forget an adapter: new requests can no longer name it, running ones finish with it, and its
        slot is freed once they have. False if no adapter has that name."""
        adapter = self.adapters.pop(name, None)
        if adapter is not None and self.loras is not None:
            self.loras.evict(adapter)
        return adapter is not None

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        lora: str | None = None,
    ) -> None:
        """lora: the name of a registered adapter to run the request with (add_lora); None: the base."""
        params = params or SamplingParams()
        if lora is not None and lora not in self.adapters:
            raise ValueError(
                f"no LoRA adapter named {lora!r}; registered: {sorted(self.adapters)} (add_lora)"
            )
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
        spec = params.structured_outputs
        seq = Sequence(
            request_id,
            ids,
            len(ids),
            params,
            next(self._arrivals),
            generator=self.processor.generator_for(params, 0),
            block_size=self.block_size,
            lora=self.adapters[lora] if lora is not None else None,
            matcher=self.grammars.matcher(spec) if spec is not None else None,
        )
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its samples) now and free its KV blocks; the next step() reports each sample
        with reason "abort"."""
        self._pending += self.processor.finish_request(request_id, "abort")

    def warm_up(self, batch_sizes: list[int] | None = None) -> dict[int, float]:
        """Compile the decode step for every padded batch size now (vLLM and SGLang do this at start-up), so
        that no request waits for a compilation; with `batch_sizes`, only the graphs that run those batches
        (a size never warmed runs eagerly). Returns seconds per compiled size ({} with enforce_eager)."""
        compiled = self.runner.compiled
        if compiled is None:
            return {}
        if batch_sizes is None:
            return compiled.warm_up()
        sizes = {compiled.size_for(b) for b in batch_sizes}
        if None in sizes:
            raise ValueError(
                f"batch sizes {batch_sizes} include one above max_num_seqs={self.config.max_num_seqs}; "
                "no graph runs it"
            )
        return compiled.warm_up(sorted(s for s in sizes if s is not None))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm, spec = self.block_manager, self.speculator.stats
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            bm.num_used,
            bm.num_blocks,
            bm.num_used / bm.num_blocks,
            self.scheduler.num_preemptions,
            bm.prefix_cache_hit_rate,
            spec.num_draft_tokens,
            spec.num_accepted_tokens,
            spec.acceptance_rate,
            spec.mean_tokens_per_step,
            bm.cache_queries * bm.block_size,
            bm.cache_hits * bm.block_size,
        )

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Draft (speculative decoding), schedule, one forward pass, process the outputs."""
        outputs, self._pending = self._pending, []
        if self.config.speculative_ngram:
            self.speculator.draft()  # before the schedule: it counts the guessed tokens too
        chunks = self.scheduler.schedule()
        if self.config.speculative_ngram:
            self.speculator.drop_unscheduled(chunks)
        if not chunks:
            return outputs
        self.num_steps += 1
        if self.record_history:
            self.history.append([c.seq.request_id for c in chunks])
        self.cache.copy_blocks(self.block_manager.take_copies())
        step = self.runner.prepare(chunks)  # lays out the logits rows: step.rows, one per chunk
        logits = self.runner.run(step)
        outputs += self.processor.process(chunks, step.rows, logits)
        if self.config.speculative_ngram:
            outputs += self.speculator.verify(chunks, step.rows, logits)
        return outputs

    # ---- convenience -------------------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, list[int]]:
        """Step until idle; returns request id -> generated token ids (the offline `LLM.generate` loop)."""
        done: dict[str, list[int]] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.index == 0:
                    done.setdefault(out.request_id, []).extend(out.new_token_ids)
        return done
