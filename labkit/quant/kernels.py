"""Fast low-bit matmuls: QuantLinear's codes re-laid out, once, for the kernels PyTorch ships.

Decode reads every weight once per step and does two FLOPs with each, so its speed is set by the bytes it
reads (see notebook 03b). A 4-bit weight is 8x fewer bytes than fp32, but only if the matmul reads the
4-bit codes directly: unpacking them into a float matrix first (QuantLinear's reference path) writes and
re-reads the full float weight, which is slower than never quantizing. These kernels dequantize inside
the matmul, a tile at a time, in registers:

    4-bit  torch.ops.aten._weight_int4pack_mm_for_cpu (CPU), _weight_int4pack_mm (CUDA, "tinygemm")
    8-bit  torch.ops.aten._weight_int8pack_mm (one scale per output channel)

Both run with bfloat16 activations: their float32 paths are not vectorised (measured 10-30x slower).
Two exceptions, for a single row inside a compiled step on a CPU: the 8-bit codes run through a reduction
that Inductor generates, in float32, twice as fast as the 8-bit kernel there (labkit/matvec.py); and where
the CPU has AVX512-VNNI, the 4-bit codes are multiplied by the row quantized to 8 bits, in integers, as
llama.cpp does (labkit/quant/vnni.py; a second packed copy of the weight, kept for that step).

The int4 kernels' convention is not GPTQ's. They take, for each group of `group_size` input columns and
each output channel, a (scale, offset) pair and compute  w = (q - 8) * scale + offset  from the unsigned
code q; GPTQ's  w = (q - zero) * scale  is the same weight with offset = (8 - zero) * scale. The repacking
is exact: with float32 scales from labkit's float16 ones, (q - 8) * scale and (8 - zero) * scale need at
most 11 + 4 significant bits, so both products and their sum are exact in float32 (tested bit for bit by
multiplying the identity matrix through the kernel). Running in bfloat16 rounds each scale and offset to
bfloat16 (8 significant bits: a relative change of at most 2^-9 per group), the price of the fast path;
QuantLinear.reference_forward keeps the exact weights.

The 8-bit kernel has no zero point: codes are stored as q - 128 (signed int8) and the asymmetric part
becomes one rank-1 correction, (128 - zero) * scale * sum(x), added in float32.
Where no kernel applies (act-order, 2/3 bits, groups the kernel does not take, a shape it rejects, a
torch build without the op) `build_kernel` returns None and QuantLinear unpacks, as before.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..matvec import matvec, use_matvec
from . import vnni
from .primitives import dequantize_values

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
COMPUTE_DTYPE = torch.bfloat16


def _contiguous_groups(g_idx: torch.Tensor, n_groups: int) -> int | None:
    """The group size if input column i belongs to group i // size (no act-order), else None."""
    in_features = g_idx.numel()
    if in_features % n_groups:
        return None
    size = in_features // n_groups
    expected = torch.arange(in_features, device=g_idx.device) // size
    return size if torch.equal(g_idx.long(), expected) else None


def _flat(x: torch.Tensor, fn) -> torch.Tensor:
    """The kernels take a 2-D [rows, in] input: flatten the leading dims and restore them. (The engine's
    inputs are 2-D already, and a decode step makes over a hundred of these calls: no reshapes for them.)"""
    if x.dim() == 2:
        return fn(x)
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int4_scale_and_offset(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """GPTQ (zero, scale) [out, groups] -> the int4 kernels' [groups, out, 2] (scale, offset), float32."""
    scale = scale.float()
    return torch.stack([scale.t(), ((8 - zero.float()) * scale).t()], dim=-1).contiguous()


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] in 0..15 -> the int4 kernel's packed weight for q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    pairs = q.to(torch.uint8)
    # CUDA's packer wants two codes per byte, the even column in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack((pairs[:, ::2] << 4 | pairs[:, 1::2]), 8)


def int4_matmul(x2d, packed, group_size: int, scale_offset) -> torch.Tensor:
    """x [rows, in] @ W.T through the int4 kernel; x's dtype must match scale_offset's."""
    if x2d.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scale_offset)
    return torch.ops.aten._weight_int4pack_mm(x2d, packed, group_size, scale_offset)


def build_int4(q, zero, scale, group_size: int, bias, dtype=COMPUTE_DTYPE) -> Callable:
    """x -> x @ W.T + bias computed in `dtype` (float32 only to check the repacking: it is slow)."""
    packed = int4_pack(q)
    scale_offset = int4_scale_and_offset(zero, scale).to(dtype)
    # a second copy for the compiled one-row step, where the CPU has integer dot products (vnni.py)
    one_row = (
        vnni.pack(q, zero, scale)
        if q.device.type == "cpu"
        and vnni.takes(q.shape[0], q.shape[1], group_size)
        and vnni.available()
        else None
    )

    def matmul(x2d):  # [rows, in] -> [rows, out]
        if one_row is not None and use_matvec(x2d):
            return vnni.matmul(x2d, one_row)
        return int4_matmul(x2d.to(dtype), packed, group_size, scale_offset)

    def run(x):  # x [..., in] -> [..., out] in x's dtype
        y = _flat(x, matmul).to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    run.nbytes = _nbytes(packed, scale_offset)  # type: ignore[attr-defined]  # read by QuantLinear.bytes_read
    run.one_row = one_row is not None  # type: ignore[attr-defined]  # benchmarks/roofline.py records it
    return run


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_int8(q, zero, scale, bias, dtype=COMPUTE_DTYPE) -> Callable:
    """Per-channel 8-bit: y = (x @ (q - 128).T) * scale + (128 - zero) * scale * sum(x), the matmul in
    `dtype` (float32 only to check the repacking), the correction in float32."""
    codes = (q.to(torch.int16) - 128).to(torch.int8).contiguous()  # [out, in]
    scale = scale[:, 0].float()  # [out]
    # [1, out]; all zero for symmetric weights
    correction = ((128 - zero[:, 0].float()) * scale)[None]
    scale_lowp = scale.to(dtype)

    def run(x):
        def matmul(x2d):  # [rows, in] -> [rows, out] float32
            x_sum = x2d.float().sum(-1, keepdim=True)  # [rows, 1]
            if use_matvec(x2d):  # one row, compiled, on a CPU: streamed in float32 (matvec.py), and
                # the correction as pointwise ops that Inductor fuses into the same loop
                return matvec(codes, x2d.float()) * scale + x_sum * correction
            y = torch.ops.aten._weight_int8pack_mm(x2d.to(dtype), codes, scale_lowp).float()
            # y + sum(x) [rows, 1] @ correction [1, out]: the rank-1 update as one op
            return torch.addmm(y, x_sum, correction)

        y = _flat(x, matmul).to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    run.nbytes = _nbytes(codes, scale_lowp, correction)  # type: ignore[attr-defined]  # read by QuantLinear.bytes_read
    return run


def build_kernel(q, zero, scale, g_idx, bits: int, bias=None) -> tuple[str, Callable] | None:
    """(name, x -> x @ W.T + bias) running from the codes q [out, in], zero and scale [out, groups],
    or None where no fast kernel applies. The kernel is checked once against the float weight on a
    random input and dropped if it disagrees (or raises), so a torch build that lacks or changes an op
    falls back to the reference path instead of computing something else."""
    n_groups = scale.shape[1]
    group_size = _contiguous_groups(g_idx, n_groups)
    if group_size is None:
        return None
    if bits == 4 and group_size in INT4_GROUP_SIZES:
        name, builder = "int4pack", lambda: build_int4(q, zero, scale, group_size, bias)
    elif bits == 8 and n_groups == 1:
        name, builder = "int8pack", lambda: build_int8(q, zero, scale, bias)
    else:
        return None
    try:
        run = builder()
        if not agrees_with_reference(run, q, zero, scale, g_idx, bias):
            return None
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return name, run


def agrees_with_reference(run, q, zero, scale, g_idx, bias, tolerance: float = 2e-2) -> bool:
    """Relative error of run(x) against x @ W.T on a random x, within bfloat16's reach."""
    x = torch.randn(4, q.shape[1], generator=torch.Generator().manual_seed(0)).to(q.device)
    idx = g_idx.long()
    weight = dequantize_values(q, scale.float()[:, idx], zero.float()[:, idx])  # [out, in]
    expected = F.linear(x, weight, None if bias is None else bias.float())
    error = (run(x).float() - expected).norm() / expected.norm().clamp_min(1e-12)
    return bool(error <= tolerance)
