"""One-row matmuls written as a multiply and a sum: how a compiled batch-1 step streams its weights on a CPU.

At batch 1 every weight matmul is a matrix-vector product: each weight is read once and used in one
multiply-add, so a decode step can go no faster than the weights stream from memory (notebook 03b's roof).
The BLAS libraries' matrix-vector code does not stream at that pace on every CPU. On a 2-core AMD EPYC
(AVX-512), one sweep over SmolLM2's 538 MB of fp32 weights, one row through each fused projection, ran at
0.43 of the measured read bandwidth through MKL (`F.linear`) and 0.71 through oneDNN's pre-packed weight;
the same products written as `(weight * x).sum(-1)` and compiled by Inductor ran at 1.01. Inductor turns the
multiply and the sum into one loop per output row that loads each weight once, converts and multiplies it in
registers and accumulates, vectorised, with the rows split over the cores: the same loop as the `sum` the
read bandwidth is measured with (labkit.roofline), plus one multiply. 8-bit codes stream the same way
(int8 -> float in registers): 0.94 of the bandwidth, against 0.48 for `_weight_int8pack_mm`. Inductor has
this idea as a graph pass of its own (`decompose_mem_bound_mm`: a CPU matmul with one row becomes a multiply
and a sum), off by default and limited to weights of at most 2,048 x 2,048; labkit writes it out, so the
output head (49,152 x 576) streams too. 4-bit codes do not: Inductor's loop unpacks nibbles and applies
group scales weight by weight, 3-5x slower than PyTorch's int4 kernel, which keeps them (quant/kernels.py),
or, on a CPU with integer dot products, an int4 x int8 kernel (quant/vnni.py).

Only inside a compiled graph: run eagerly, `weight * x` would first write a float copy of the whole weight.
`use_matvec(x)` says when to take this path.
"""

import torch


def use_matvec(x: torch.Tensor) -> bool:
    """Is x [rows, in] one row being traced into a compiled graph on a CPU? (Eagerly, on a GPU, or with more
    rows, the library kernels are the right path.)"""
    return (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] == 1
    )


def matvec(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, in] @ weight [out, in].T + bias -> [1, out] in x's dtype, as a float32 multiply and a sum over
    `in`. weight may be float32, bfloat16 or int8 codes (the caller applies their scales)."""
    y = (weight.float() * x.float()).sum(-1)[None]  # [1, out]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
