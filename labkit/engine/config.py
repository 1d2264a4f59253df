"""EngineConfig: every knob of the engine in one validated place, with the one copy of each default.

The engine, the scheduler, `LLM`, the server and the benchmarks all read their settings from here, so a
default (how many sequences run at once, how big a block is) is written once and checked once:

    LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8))
    LLMEngine(model, tokenizer, max_num_seqs=8)              # the same: keywords build the config
"""

from dataclasses import dataclass, fields, replace

import torch

from .kv_quant import kv_format


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks in the cache; None = sized from a memory budget
    max_num_seqs: int = 32  # sequences running at once (the batch size of a decode step)
    max_num_batched_tokens: int = 2048  # tokens one step may feed in (long prompts are chunked)
    enable_prefix_caching: bool = True  # share the KV blocks of identical prompt prefixes
    seed: int = 0  # the engine's generator, used by requests that bring no seed of their own
    # how K and V are stored: "auto" (the model's dtype), a float torch.dtype, or 8 bits with scales,
    # "int8" or "fp8_e4m3" (vLLM's --kv-cache-dtype values; kv_quant.py)
    kv_cache_dtype: str | torch.dtype = "auto"
    # speculative decoding by prompt lookup (speculative.py): the longest n-gram to look up, 0 = off
    speculative_ngram: int = 0
    num_speculative_tokens: int = (
        4  # tokens drafted (and verified in one step) per sequence at most
    )

    # run every step eagerly (vLLM's name); by default plain decode steps run compiled (compiled_decode.py)
    enforce_eager: bool = False
    # when decode steps compile (compiled_decode.py): None = when LLMEngine.warm_up() is called (all sizes
    # up front, as vLLM does at start-up); n = a size also compiles once it has run n steps eagerly
    compile_after_steps: int | None = None
    # a sequence's logits bit-identical whatever else is in the batch (vLLM's and SGLang's batch-invariant
    # mode): one matmul kernel for every row count, every step eager (notebook 05b)
    batch_invariant: bool = False
    # LoRA adapters (vLLM's flags): requests may name an adapter (lora.py); up to max_loras adapters sit in
    # slots at once, of rank up to max_lora_rank (lora_slots.py). Steps with an adapter in them run eagerly
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras"):
            require_int(name, getattr(self, name), low=1)
        if self.num_blocks is not None:
            require_int(
                "num_blocks",
                self.num_blocks,
                low=1,
                hint="None (sized from a memory budget) or an int",
            )
        require_int("seed", self.seed, low=-(2**63))
        require_int("speculative_ngram", self.speculative_ngram, low=0, hint="an int (0 = off)")
        require_int("num_speculative_tokens", self.num_speculative_tokens, low=1)
        if self.compile_after_steps is not None:
            require_int(
                "compile_after_steps", self.compile_after_steps, low=0, hint="None or an int"
            )
        require_int("max_lora_rank", self.max_lora_rank, low=1)
        for name in ("enable_prefix_caching", "enforce_eager", "batch_invariant", "enable_lora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        kv_format(self.kv_cache_dtype)  # raises, listing the valid values, for an unknown one
        dtype = self.kv_cache_dtype
        if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point and dtype.itemsize >= 2):
            raise ValueError(
                f"kv_cache_dtype {dtype} is not a 16- or 32-bit float dtype: for an 8-bit cache with "
                f'scales pass "int8" or "fp8_e4m3"'
            )

    @classmethod
    def build(cls, config: "EngineConfig | None" = None, **overrides) -> "EngineConfig":
        """`config` (or the defaults) with keyword overrides, e.g. build(None, max_num_seqs=8); an unknown
        keyword is an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; the options are {sorted(known)}")
        if config is None:
            return cls(**overrides)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        return replace(config, **overrides)


INT64_MAX = 2**63 - 1


def require_int(name: str, value, low: int, high: int = INT64_MAX, hint: str = "an int") -> None:
    """A real int (not a bool, not a float) in low..high, else a ValueError that names the parameter."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        bounds = f">= {low}" if high == INT64_MAX else f"in {low}..{high}"
        raise ValueError(f"{name} must be {hint} {bounds}, got {value!r}")
