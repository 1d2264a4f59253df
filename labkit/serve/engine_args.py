"""What the server's engine is built from, as one typed, frozen, picklable object.

The CLI fills it from its flags (config.py generates them from these fields and from EngineConfig's);
the engine process receives it (pickled through multiprocessing's spawn) and builds its own model and
engine from it; the HTTP process uses it to load the tokenizer without loading any weights. One object,
so neither side depends on the other's attribute names.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.engine import EngineConfig, LLMEngine
from labkit.model import load_model, load_tokenizer

from .options import check, option

DTYPES = ("float32", "bfloat16", "float16")


def parse_lora_modules(items: list[str]) -> tuple[tuple[str, str], ...]:
    """vLLM's `--lora-modules name=path [name=path ...]` as ((name, path), ...)."""
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (name, eq, path) in zip(items, pairs) if not (name and eq and path)]
    if bad:
        raise ValueError(f"--lora-modules takes name=path pairs, got {bad}")
    return tuple((name, path) for name, _, path in pairs)


@dataclass(frozen=True)
class EngineArgs:
    """The model to serve and how to load it, and the engine's own EngineConfig."""

    model: str | None = option(None, "None/'course' = the course model; a directory or hub id")
    quantized: str | None = option(
        None,
        "a GPTQ checkpoint directory (labkit.quant.export_gptq) to serve instead of --model",
        metavar="DIR",
    )
    dtype: str = option("float32", "the weights' dtype", choices=DTYPES)
    device: str | None = option(None, "cpu / cuda (default: cuda when present)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", low=1)
    warm_up: bool = option(
        False,
        "compile the decode step (LLMEngine.warm_up) before taking requests, as vLLM does at start-up: "
        "faster decode steps for 20-70 s more start-up on a 2-core CPU (seconds from the compile cache)",
    )
    lora_modules: tuple[tuple[str, str], ...] | None = option(
        None,
        "LoRA adapters to serve from the start, each name=path (a peft directory; clients send the "
        "name as `model`); needs --enable-lora, as in vLLM",
        metavar="NAME=PATH",
        nargs="+",
        load=parse_lora_modules,
    )
    config: EngineConfig = field(  # its flags come from EngineConfig's own fields (options.py)
        default_factory=EngineConfig,
        metadata={
            "help": "the engine's knobs, labkit/engine/config.py (KV blocks, batch limits...)"
        },
    )

    def __post_init__(self):
        check(self)
        if self.lora_modules and not self.config.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora (EngineConfig.enable_lora)")

    def load_tokenizer(self):
        """A quantized checkpoint's own tokenizer where it ships one, else the model's. Loads no
        weights, so the HTTP process can use it while the engine process loads the model."""
        if self.quantized and (Path(self.quantized) / "tokenizer_config.json").exists():
            return load_tokenizer(self.quantized)
        return load_tokenizer(self.model)

    def load_model(self):
        dtype = getattr(torch, self.dtype)
        if self.quantized:  # a GPTQ checkpoint (export_gptq or GPTQModel), run by QuantLinear
            from labkit.quant import load_gptq  # (the quantization stack only when asked for)

            model, _ = load_gptq(self.quantized, device=self.device, dtype=dtype)
            return model
        model, _ = load_model(self.model, device=self.device, dtype=dtype)
        return model

    def build_engine(self) -> LLMEngine:
        if self.threads:
            torch.set_num_threads(self.threads)
        engine = LLMEngine(self.load_model(), self.load_tokenizer(), self.config)
        for name, path in self.lora_modules or ():
            engine.add_lora(name, path)
        if self.warm_up:
            engine.warm_up()
        return engine
