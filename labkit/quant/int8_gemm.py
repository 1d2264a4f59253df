"""Real INT8 matrix multiplies on this CPU, timed against float32: what W8A8 is meant to buy.

w8a8.py simulates the rounding in float; the speed only exists if an int8 x int8 -> int32 kernel runs.
On a CPU there are two in PyTorch:

- torch._int_mm(a, b): int8 [m, k] @ int8 [k, n] -> int32 [m, n] (oneDNN/mkldnn on x86), with the
  quantization of x and the rescaling of the int32 result done around it (int8_linear below);
- torch.ao's dynamic quantized Linear (fbgemm): int8 weights, activations quantized per call, one fused op.

Whether either beats float32 depends on the CPU: with VNNI/AMX (AVX512-VNNI, AMX-INT8) int8 dot
products run at 2-4x the float rate; with only AVX2 the int8 path widens to int16 and often gains
nothing, and at batch 1 the extra quantize/rescale passes can make it slower. We measure, never assume.
"""

import copy
import warnings

import torch
import torch.nn as nn

from ..timing import time_it
from .w8a8 import block_linears


def quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8, one scale per row: (q int8 [rows, cols], scale float [rows, 1])."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127
    return torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, w_q_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x float [tokens, in] @ W^T through torch._int_mm; w_q_t int8 [in, out] (W's codes, transposed),
    w_scale [out, 1]. Activations per token. Same result as checks.reference_int8_linear_dynamic."""
    x_q, x_scale = quantize_rows_int8(x)  # [tokens, in], [tokens, 1]
    acc = torch._int_mm(x_q, w_q_t)  # int32 [tokens, out], exact
    return acc.float() * x_scale * w_scale.t()


def fbgemm_linear(linear: nn.Linear) -> nn.Module:
    """torch.ao's dynamic int8 Linear (fbgemm): int8 weights, activations quantized on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (ptq.py says why we use it)
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8
        )


def linear_shapes(model) -> list[tuple[int, int]]:
    """The distinct (in_features, out_features) of the decoder blocks' linears."""
    shapes = {(m.in_features, m.out_features) for m in block_linears(model).values()}
    return sorted(shapes)


@torch.no_grad()
def time_gemm(in_f: int, out_f: int, tokens: int, runs: int = 20, seed: int = 0) -> dict:
    """Median milliseconds of one [tokens, in] @ [in, out] product, four ways: fp32; torch._int_mm
    alone (x already int8); int8_linear (quantize x, _int_mm, rescale); fbgemm's dynamic Linear."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(tokens, in_f, generator=g)
    w_q, w_scale = quantize_rows_int8(lin.weight)
    w_q_t, x_q = w_q.t().contiguous(), quantize_rows_int8(x)[0]
    fb = fbgemm_linear(copy.deepcopy(lin))
    paths = {
        "fp32": lambda: lin(x),
        "int_mm": lambda: torch._int_mm(x_q, w_q_t),
        "int8_linear": lambda: int8_linear(x, w_q_t, w_scale),
        "fbgemm": lambda: fb(x),
    }
    row: dict = {"in": in_f, "out": out_f, "tokens": tokens}
    row.update({k: time_it(fn, warmup=2, runs=runs).median * 1e3 for k, fn in paths.items()})
    return row


def time_gemms(shapes: list[tuple[int, int]], tokens: int, runs: int = 20) -> list[dict]:
    """time_gemm for each (in, out) shape."""
    return [time_gemm(in_f, out_f, tokens, runs) for in_f, out_f in shapes]
