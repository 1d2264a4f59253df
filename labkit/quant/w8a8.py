"""W8A8: weights *and* activations in 8 bits, simulated in float (fake quantization), INT8 or FP8.

Weight-only schemes (RTN, GPTQ, AWQ) shrink the bytes a decode step reads; W8A8 also lets the matmul
itself run on 8-bit units (INT8 tensor cores / VNNI, FP8 tensor cores on H100), which is what speeds
up compute-bound prefill and large batches. The hard part is the activations: they are only known at
run time, and a few input *channels* of a trained transformer are tens of times larger than the rest.
Which values share one scale decides how much that costs:

- per-tensor: one scale for the whole activation (static from calibration, or dynamic per call).
  The outlier channel sets the scale, and ordinary values fall onto a handful of the 255 levels.
- per-token: one scale per row, computed on the fly. Still legal in an integer matmul (the scale
  factors out of the sum over input channels), but a channel that is loud in every token still
  sets every token's scale.

Weights use one scale per output channel for INT8 (it factors out too), one per tensor for FP8.
INT8 rounds to a uniform grid of 2^(b-1) - 1 steps either side of 0; FP8 E4M3 (torch.float8_e4m3fn:
4 exponent bits, 3 mantissa bits, largest value 448) has a relative grid, fine near 0 and coarse near
448, so a per-tensor scale hurts it far less. Everything here quantizes then dequantizes in float32,
so it measures the rounding exactly but not the speed (int8_gemm.py times real INT8 kernels).

LLM.int8() (Dettmers et al., 2022) handles outliers differently: the input columns whose activations
exceed a threshold (6.0 in the paper) are multiplied in float, the rest in INT8 per token x per row.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import find_blocks, find_linears, get_weight
from .primitives import check_bits

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
ACT_GRANULARITIES = ("tensor", "token")


def _scale(t: torch.Tensor, qmax: float, per_row: bool, absmax: torch.Tensor | None):
    """absmax / qmax: one scale [..., 1] per row, or one for the tensor (given, or from t itself)."""
    if absmax is None:
        absmax = t.abs().amax(-1, keepdim=True) if per_row else t.abs().amax()
    return absmax.float().clamp(min=1e-8) / qmax


def fake_quant(
    t: torch.Tensor,
    bits: int = 8,
    per_row: bool = False,
    fp8: bool = False,
    absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric quantize-dequantize of t [..., features]: INT{bits} or FP8 E4M3, one scale per row or
    per tensor. absmax fixes the per-tensor range (static quantization); values beyond it saturate."""
    if absmax is not None and per_row:
        raise ValueError("a fixed absmax (static quantization) is per tensor: use per_row=False")
    if fp8:
        scale = _scale(t, FP8_MAX, per_row, absmax)
        x = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX)
        return (x.to(torch.float8_e4m3fn).float() * scale).to(t.dtype)
    qmax = 2 ** (check_bits(bits) - 1) - 1
    scale = _scale(t, qmax, per_row, absmax)
    return (torch.clamp(torch.round(t.float() / scale), -qmax, qmax) * scale).to(t.dtype)


def check_act(act: str) -> str:
    if act not in ACT_GRANULARITIES:
        raise ValueError(f"act must be one of {ACT_GRANULARITIES} (activation scales), got {act!r}")
    return act


class W8A8Linear(nn.Module):
    """A linear whose weight is stored fake-quantized and whose input is fake-quantized on every call.

    act="token": one dynamic scale per token. act="tensor": one per call (dynamic), or, given
    act_absmax (the calibration's largest |x|), one fixed scale (static).
    """

    def __init__(
        self,
        linear: nn.Linear,
        act: str = "token",
        bits: int = 8,
        fp8: bool = False,
        act_absmax: torch.Tensor | None = None,
    ):
        super().__init__()
        self.act, self.bits, self.fp8 = check_act(act), check_bits(bits), fp8
        if act_absmax is not None and act != "tensor":
            raise ValueError("a static activation range (act_absmax) needs act='tensor'")
        w = get_weight(linear).detach()  # [out, in] (also for GPT-2's transposed Conv1D)
        self.weight = nn.Parameter(fake_quant(w, bits, per_row=not fp8, fp8=fp8), False)
        self.bias = linear.bias
        self.register_buffer("act_absmax", None if act_absmax is None else act_absmax.max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        x_hat = fake_quant(x, self.bits, self.act == "token", self.fp8, self.act_absmax)
        return F.linear(x_hat, self.weight, self.bias)


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(
            f"threshold must be a number >= 0 (LLM.int8() uses 6.0), got {threshold!r}"
        )
    return float(threshold)


def int8_decomposed_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0):
    """LLM.int8()'s x @ w.T for x [tokens, in], w [out, in]: input columns where some |x| >= threshold
    in float, the rest with INT8 activations per token and INT8 weights per output row.

    threshold=0 puts every column in float (exact); a huge threshold is plain per-token W8A8.
    """
    outlier = x.abs().amax(0) >= check_threshold(threshold)  # [in]
    y = x[:, outlier] @ w[:, outlier].t()  # [tokens, out], float
    if not outlier.all():
        x_r, w_r = x[:, ~outlier], w[:, ~outlier]
        y = y + fake_quant(x_r, per_row=True) @ fake_quant(w_r, per_row=True).t()
    return y


class Int8DecomposedLinear(nn.Module):
    """A linear computed by int8_decomposed_matmul; outlier columns are chosen per call, as in the paper."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        self.threshold = check_threshold(threshold)
        self.weight = nn.Parameter(get_weight(linear).detach(), False)  # [out, in]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        x2 = x.reshape(-1, x.shape[-1])
        y = int8_decomposed_matmul(x2, self.weight, self.threshold)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def block_linears(model) -> dict[str, nn.Module]:
    """Every linear of the decoder blocks, by full name (the output head stays float, as in ptq.py)."""
    name, blocks = find_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(find_linears(block, f"{name}.{i}."))
    return out


def replace_linears(model, make) -> nn.Module:
    """In place: every block linear `name` becomes make(name, linear). Returns the model."""
    for name, linear in block_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(name, linear))
    return model


def w8a8_model(
    model,
    act: str = "token",
    bits: int = 8,
    fp8: bool = False,
    act_absmax: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """In place: W8A8 fake quantization of every block linear. act_absmax (from
    smoothquant.activation_absmax) makes per-tensor activation scales static."""
    check_act(act)
    check_bits(bits)
    return replace_linears(
        model,
        lambda name, lin: W8A8Linear(
            lin, act, bits, fp8, None if act_absmax is None else act_absmax[name]
        ),
    )


def llm_int8_model(model, threshold: float = 6.0) -> nn.Module:
    """In place: LLM.int8() mixed decomposition in every block linear."""
    check_threshold(threshold)
    return replace_linears(model, lambda name, lin: Int8DecomposedLinear(lin, threshold))
