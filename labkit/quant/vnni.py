"""4-bit weights times 8-bit activations, in integers: how a one-row int4 step beats PyTorch's int4 kernel.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, quant/kernels.py) converts every 4-bit weight to
a float before it multiplies: at batch 1 it is compute-bound, not memory-bound (SmolLM2's compiled int4 step
spends nearly all its time in it, at about 20 G weights/s on a 2-core AMD EPYC). llama.cpp does it the other
way round: it quantizes the activation row to 8 bits (its Q8 blocks) and multiplies 4-bit by 8-bit codes
with integer dot products, `vpdpbusd` on AVX512-VNNI, which multiplies 64 byte pairs and adds them into 16
int32 sums in one instruction; the scales are applied once per block of products, not once per weight.

torchao ships that kernel for x86 as `da8w4_linear_cpu` ("dynamic activation int8, weight int4"), but its
PyPI wheel does not include the CPU build, and it takes the integer path only on CPUs with AMX. labkit
vendors the one C++ file (csrc/da8w4_linear.cpp, BSD license, changes marked "labkit:"), lets its one-row
path run on any AVX512-VNNI CPU, and builds it on first use with `torch.utils.cpp_extension` (a C++ compiler
and ninja, about 30 s, cached under .cache/torch_extensions/ in the repository; labkit/native.py).

Measured on a 2-core AMD EPYC (AVX512-VNNI, no AMX), one row through all 121 of SmolLM2's int4 matmuls as
the engine runs them (q/k/v and gate/up fused, groups of 64, output head included), the row already
quantized: 3.4-3.8 ms per sweep against 4.6-4.9 for PyTorch's int4 kernel with bfloat16 activations
(2 threads; one thread: 5.3 against 8.1). benchmarks/results/roofline.json has the whole step.

The price is the activation's rounding: x becomes s * a with a in [-127, 127], one scale per row
(symmetric, as llama.cpp's Q8_0). On random rows through SmolLM2-shaped weights that adds 0.8% of relative
error to each matmul's output, against 9% for rounding the weights to 4 bits in groups of 64.

labkit's op (`da8w4_linear_float`) quantizes the row itself, in C++, so that a compiled step calls one op per
matmul, not a dozen (`quantize_rows` is the same arithmetic in PyTorch, tested against it). Only the
compiled one-row step uses it (`matvec.use_matvec`; quant/kernels.py). Eagerly PyTorch's int4 kernel stays:
the eager path is the reference the compiled step is tested against. And from 5 rows up this build has no
fast path without AMX.
"""

import os
from functools import cache

import torch

from .. import native
from ..paths import REPO_ROOT

SOURCE = REPO_ROOT / "labkit" / "quant" / "csrc" / "da8w4_linear.cpp"
# the AVX-512 code paths of the kernel and of ATen's vector headers it includes
CAPABILITY = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY_AVX512_VNNI"]
BLOCK_N = 32  # output channels per block of the packed weight (the kernel's BLOCK_N)
GROUP_SIZES = (32, 64, 128)  # what its packing takes
DISABLE = "LABKIT_NO_VNNI"  # set to 1: PyTorch's int4 kernel everywhere


@cache
def available() -> bool:
    """Can this machine run the kernel? A CPU with AVX512-VNNI, a C++ compiler and ninja, and the kernel
    built (now, the first time: about 30 s; labkit/native.py). False, and the int4 kernel everywhere,
    otherwise."""
    if os.environ.get(DISABLE) == "1" or not torch.cpu._is_vnni_supported():
        return False
    if not native.build(
        "labkit_vnni",
        SOURCE,
        CAPABILITY,
        "int4 models run PyTorch's int4 kernel everywhere",
        DISABLE,
    ):
        return False
    torch.library.register_fake("labkit_vnni::da8w4_linear_float")(_matmul_shape)
    return True


def takes(out_features: int, in_features: int, group_size: int) -> bool:
    """Does the kernel take this weight shape and group size?"""
    return (
        out_features % BLOCK_N == 0 and in_features % group_size == 0 and group_size in GROUP_SIZES
    )


def pack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPTQ codes q [out, in] in 0..15, zero and scale [out, groups] (w = (q - zero) * scale) -> the
    kernel's blocked weight: codes two to a byte in VNNI order, scales (float32) and zero points (int8) per
    block of 32 channels. The prepack also sums each block's (q - zero), which only an asymmetric (uint8)
    activation reads; labkit's rows are symmetric (`quantize_rows`), so an empty tensor stands in for it
    and the second copy stays at 0.58 bytes a weight instead of 0.64."""
    if not available():
        raise RuntimeError(
            "the int4 x int8 kernel needs a CPU with AVX512-VNNI, a C++ compiler and ninja (and "
            f"{DISABLE} unset): check labkit.quant.vnni.available() first"
        )
    weight, scales, zeros, _ = torch.ops.labkit_vnni.da8w4_linear_prepack_cpu(
        q.to(torch.uint8).contiguous(), scale.float().contiguous(), zero.to(torch.int8).contiguous()
    )
    return weight, scales, zeros, torch.empty(0, dtype=torch.int32)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (a int8 [rows, in], s float32 [rows]) with x ~ s * a, a in [-127, 127]. The
    readable form of what the kernel does first (csrc: da8w4_linear_float_impl), tested against it."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # [rows, 1]
    a = (x / s).round().clamp(-127, 127).to(torch.int8)
    return a, s[:, 0]


def matmul(x2d: torch.Tensor, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x [rows <= 4, in] @ W.T -> [rows, out] float32: each row quantized to 8 bits (`quantize_rows`), then
    integer dot products, all in one op."""
    return torch.ops.labkit_vnni.da8w4_linear_float(x2d.float(), *packed)


def _matmul_shape(x, weight, scales, zeros, compensation):
    """The op's output for tracing: [rows, in] -> [rows, out] float32, from the blocked weight's shape
    [out / BLOCK_N, in / block_k, block_k, BLOCK_N / 2]."""
    return x.new_empty((*x.shape[:-1], weight.shape[0] * weight.shape[-1] * 2), dtype=torch.float32)
