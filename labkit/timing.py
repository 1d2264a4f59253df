"""Time things the way benchmarks should: warm up first, repeat, report the median.

The first call pays for lazy initialisation (kernel selection, memory allocation, caches); a single
timing is noise. On a GPU, work is asynchronous, so we synchronise before reading the clock.
"""

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def __str__(self) -> str:
        return f"median {self.median * 1e3:.1f} ms (min {self.min * 1e3:.1f}, {len(self.seconds)} runs)"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn, warmup: int = 1, runs: int = 5) -> Timing:
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


@torch.no_grad()
def decode_tokens_per_second(
    model,
    tokenizer,
    prompt: str = "It is a truth universally acknowledged",
    new_tokens: int = 64,
    warmup: int = 1,
    runs: int = 3,
) -> float:
    """Greedy generation speed with Hugging Face `generate` (KV cache on), median of `runs`."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)

    def run():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    return new_tokens / time_it(run, warmup, runs).median
