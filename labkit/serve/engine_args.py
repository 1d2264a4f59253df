"""What the server's engine is built from, as one typed, picklable object.

The CLI fills it from its flags; the engine process receives it (pickled through multiprocessing's
spawn) and builds its own model and engine from it; the HTTP process uses it to load the tokenizer
without loading any weights. One object, so neither side depends on the other's attribute names.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.engine import EngineConfig, LLMEngine
from labkit.model import load_model, load_tokenizer

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EngineArgs:
    model: str | None = None  # None / "course": the course model; else a directory or hub id
    quantized: str | None = None  # a GPTQ checkpoint directory to serve instead of `model`
    dtype: str = "float32"
    device: str | None = None  # None: cuda when present
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    config: EngineConfig = field(default_factory=EngineConfig)  # KV blocks, batch limits...

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def load_tokenizer(self):
        """A quantized checkpoint's own tokenizer where it ships one, else the model's. Loads no
        weights, so the HTTP process can use it while the engine process loads the model."""
        if self.quantized and (Path(self.quantized) / "tokenizer_config.json").exists():
            return load_tokenizer(self.quantized)
        return load_tokenizer(self.model)

    def load_model(self):
        dtype = getattr(torch, self.dtype)
        if (
            self.quantized
        ):  # a GPTQ checkpoint (labkit.quant.export_gptq or GPTQModel), run by QuantLinear
            from labkit.quant import load_gptq  # (the quantization stack only when asked for)

            model, _ = load_gptq(self.quantized, device=self.device, dtype=dtype)
            return model
        model, _ = load_model(self.model, device=self.device, dtype=dtype)
        return model

    def build_engine(self) -> LLMEngine:
        if self.threads:
            torch.set_num_threads(self.threads)
        return LLMEngine(self.load_model(), self.load_tokenizer(), self.config)
