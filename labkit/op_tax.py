"""The per-op tax: how many operations a decode step dispatches, what each costs, and what Inductor made of them.

A framework pays a fixed cost for every operation before the kernel does any work: Python, the dispatcher,
allocating the output, and on a GPU a kernel launch. A step of a small model is a long chain of small
operations, so this tax can outweigh the arithmetic (notebook 03d). `op_profile` counts it with
torch.profiler; `inductor_code` and `fused_kernels` show what a compiled step runs instead.
"""

import os
import re
import time
from collections import Counter
from dataclasses import dataclass

import torch

from .roofline import MATMUL_OPS


@dataclass
class OpProfile:
    """One step, averaged over the profiled calls."""

    step_ms: float  # wall time of a step, timed without the profiler
    ops_per_step: int  # aten operations the step dispatched (each pays the tax at least once)
    matmul_ms: float  # the weight matmuls' own CPU time
    other_ms: float  # everything else: step_ms - matmul_ms
    top_ops: list[tuple[str, int]]  # the most frequent operations, (name, calls per step)

    @property
    def us_per_other_op(self) -> float:
        """Mean cost of an operation that is not a weight matmul: the tax plus its (small) work."""
        return 1e3 * self.other_ms / max(1, self.ops_per_step)


def op_profile(run, calls: int = 8) -> OpProfile:
    """Time `run()` (one decode step) plainly, then count its operations under torch.profiler."""
    start = time.perf_counter()
    for _ in range(calls):
        run()
    step_s = (time.perf_counter() - start) / calls
    os.environ.setdefault(
        "KINETO_LOG_LEVEL", "6"
    )  # keep kineto's start/stop lines out of notebooks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    # the operations the step dispatched itself: aten ops not called from inside another aten op (`to`
    # calls `_to_copy`, which calls `copy_`: one dispatch from the step, three records)
    ops = Counter(e.name for e in prof.events() if e.name.startswith("aten::") and outermost(e))
    matmul_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    matmul_s = min(matmul_us / 1e6 / calls, step_s)
    return OpProfile(
        step_ms=1e3 * step_s,
        ops_per_step=sum(ops.values()) // calls,
        matmul_ms=1e3 * matmul_s,
        other_ms=1e3 * (step_s - matmul_s),
        top_ops=[(name, n // calls) for name, n in ops.most_common(6)],
    )


def outermost(event) -> bool:
    """No aten op above this profiler event."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent is None


def inductor_code() -> str:
    """The Python module Inductor generated most recently in this process (it calls the fused C++ kernels
    and the library kernels, such as the matmuls, in order)."""
    from torch._inductor.codecache import PyCodeCache

    modules = [m for m in PyCodeCache.modules if getattr(m, "__file__", None)]
    if not modules:
        raise RuntimeError("nothing compiled yet in this process: warm an engine up first")
    with open(modules[-1].__file__) as f:
        return f.read()


def fused_kernels(code: str) -> dict[str, str]:
    """Inductor's fused C++ loops in that module: kernel name -> its C++ source."""
    pattern = r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?'''(.*?)'''"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, code, re.M | re.S)}


def calls_per_step(code: str) -> Counter:
    """What the generated step calls, by kind: 'fused C++ loop', or the name of a library kernel
    (matmuls, attention) that Inductor calls as it is."""
    body = code[code.index("    def call(self, args):") :]
    calls: Counter = Counter()
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("cpp_fused_"):
            calls["fused C++ loop"] += 1
        elif match := re.match(r"(?:\w+ = )?(?:extern_kernels|torch\.ops\.\w+)\.(\w+)", line):
            calls[match.group(1)] += 1
    return calls
