"""Quantize and dequantize a tensor: the two formulas everything else in labkit.quant is built on.

A b-bit quantizer maps a real number w to an integer q in [0, 2^b - 1] and back:

    q = clamp(round(w / scale) + zero, 0, 2^b - 1)          w_hat = (q - zero) * scale

*Symmetric* quantization fixes zero = 2^(b-1) (the middle of the range) so 0.0 is exact, and (as GPTQ does)
spreads all 2^b levels over [-max|w|, max|w|]: scale = 2 max|w| / (2^b - 1). The grid points are then
-2^(b-1)..2^(b-1)-1 times scale, and no value is further than scale/2 from one (max|w| itself lands half
a step below the top level). The textbook variant scale = max|w| / (2^(b-1) - 1) wastes one level: at 3 bits
that is 1 of 8. *Asymmetric* (zero-point)
quantization fits the grid to [min, max] instead: scale = (max - min) / (2^b - 1), zero = round(-min / scale),
so no level is wasted when the values are lopsided (e.g. after a ReLU).

Granularity says which values share one (scale, zero): the whole tensor, each output channel (row), or
each group of `group_size` consecutive input columns within a row. Finer granularity = less error, more
scales to store. Storing q as unsigned integers with an explicit zero is also the GPTQ checkpoint layout,
so the same numbers can be packed and exported (see packing.py).

Scales are rounded to float16 here, because that is how every checkpoint format stores them: the
quantized weights we evaluate are then bit-for-bit the ones an exported model computes with.
"""

from dataclasses import dataclass

import torch

from .scheme import QuantScheme, as_scheme, check_bits


def check_weight(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    return w


def scale_zero_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """(scale, zero) that map [lo, hi] onto the b-bit grid; lo <= 0 <= hi is enforced so 0.0 stays exact."""
    check_bits(bits)
    lo, hi = lo.clamp(max=0).float(), hi.clamp(min=0).float()
    maxq = 2**bits - 1
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (hi - lo) / maxq
    # an all-zero group: any scale works
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # stored as fp16 on disk: round *up* to the next fp16 value so the range still covers [lo, hi]
    s16 = scale.clamp(min=torch.finfo(torch.float16).tiny).half()
    scale = torch.where(
        s16.float() < scale,
        torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.float16)),
        s16,
    ).float()
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_values(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """round(w / scale) + zero, clamped to [0, 2^b - 1]; returned as int32 (unsigned values)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1).to(torch.int32)


def dequantize_values(q: torch.Tensor, scale, zero) -> torch.Tensor:
    return (q.float() - zero) * scale


@dataclass
class QuantizedWeight:
    """Integer codes plus what is needed to recover the weight.

    q: int32 [out, in] in [0, 2^b - 1]; scale, zero: float [out, n_groups] (one column per group);
    g_idx: int32 [in], the group of each input column (GPTQ's name; act-order makes it non-monotonic).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int  # 0 = per-tensor, in_features = per-channel
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        idx = self.g_idx.long()
        return (self.q.float() - self.zero[:, idx]) * self.scale[:, idx]


def quantize_weight(
    w: torch.Tensor,
    bits: QuantScheme | int = 4,
    symmetric: bool = True,
    granularity: str = "group",
    group_size: int | None = 128,
    clip_ratio: torch.Tensor | float | None = None,
) -> QuantizedWeight:
    """Round-to-nearest (RTN) quantization of a 2-D weight [out, in]: quantize_weight(w, scheme), or
    the loose form quantize_weight(w, 4, True, "group", 64).

    clip_ratio (scalar or [out, n_groups]) shrinks each group's range before quantizing: AWQ searches it.
    """
    scheme = as_scheme(bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    w = check_weight(w).float()
    out_f, in_f = w.shape
    gs = scheme.columns_per_group(in_f)
    groups = w.reshape(1, 1, -1) if gs == 0 else w.reshape(out_f, in_f // gs, gs)
    lo, hi = groups.amin(-1), groups.amax(-1)
    if clip_ratio is not None:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    scale, zero = scale_zero_from_range(lo, hi, scheme.bits, scheme.symmetric)
    if gs == 0:
        scale, zero = scale.reshape(1, 1).expand(out_f, 1), zero.reshape(1, 1).expand(out_f, 1)
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    else:
        g_idx = (torch.arange(in_f) // gs).to(torch.int32)
    idx = g_idx.long()
    q = quantize_values(w, scale[:, idx], zero[:, idx], scheme.bits)
    return QuantizedWeight(
        q, scale.contiguous(), zero.contiguous(), g_idx, scheme.bits, gs, scheme.symmetric
    )


def fake_quantize(
    w: torch.Tensor,
    bits: QuantScheme | int = 4,
    symmetric: bool = True,
    granularity: str = "group",
    group_size: int | None = 128,
) -> torch.Tensor:
    """Quantize then dequantize: the weight a quantized model actually computes with, in w's dtype."""
    return quantize_weight(w, bits, symmetric, granularity, group_size).dequantize().to(w.dtype)


# ---- the two textbook formulas on a single tensor (notebook 01's exercises) -------------------------------


def quantize_symmetric(x: torch.Tensor, bits: int = 8):
    """Per-tensor symmetric: returns (q signed int in [-(2^(b-1)-1), 2^(b-1)-1], scale). x_hat = q * scale."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max().float().clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int32)
    return q, scale


def dequantize_symmetric(q: torch.Tensor, scale) -> torch.Tensor:
    return q.float() * scale


def quantize_asymmetric(x: torch.Tensor, bits: int = 8):
    """Per-tensor asymmetric: returns (q unsigned int in [0, 2^b-1], scale, zero). x_hat = (q - zero) * scale."""
    check_bits(bits)
    maxq = 2**bits - 1
    lo, hi = x.min().float().clamp(max=0), x.max().float().clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq).to(torch.int32)
    return q, scale, zero


def dequantize_asymmetric(q: torch.Tensor, scale, zero) -> torch.Tensor:
    return (q.float() - zero) * scale


def quantization_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||w - w_hat|| / ||w||: comparable across layers and tensors."""
    return ((w.float() - w_hat.float()).norm() / w.float().norm().clamp(min=1e-12)).item()
