"""Time things the way benchmarks should: warm up first, repeat, report the median.

The first call pays for lazy initialisation (kernel selection, memory allocation, caches); a single
timing is noise. On a GPU, work is asynchronous, so we synchronise before reading the clock.
"""

import os
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


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all programs on this machine have used since boot (Linux /proc/stat), else None."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + waiting for I/O
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores *other* programs kept busy while a block of code ran, so a timing demo can say when
    its numbers were taken on a loaded machine.

        with OtherLoad(lambda: time.process_time() + server.cpu_seconds()) as load:
            ...                          # the timed demo
        print(load.verdict())

    own_cpu_seconds: CPU seconds used so far by the programs being measured (this kernel, a server...);
    the rest of the machine's busy time over the block is the others'. `cores` is None off Linux."""

    def __init__(self, own_cpu_seconds):
        self.own_cpu_seconds = own_cpu_seconds
        self.cores: float | None = None
        self.total_cores = os.cpu_count() or 1

    def __enter__(self) -> "OtherLoad":
        self._start = (time.perf_counter(), _busy_cpu_seconds(), self.own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _busy_cpu_seconds(), self.own_cpu_seconds()
        if busy is not None and busy0 is not None and wall > 0:
            self.cores = max(0.0, (busy - busy0) - (own - own0)) / wall

    def verdict(self, threshold: float = 0.5) -> str:
        if self.cores is None:
            return "(the load from other programs is unknown here: /proc/stat is Linux-only)"
        taken = f"other programs kept {self.cores:.1f} of {self.total_cores} cores busy meanwhile"
        if self.cores < threshold:
            return f"machine quiet: {taken}"
        return f"machine LOADED: {taken}; these timings include waiting for a core"
