"""QuantLinear: a linear layer that keeps only packed integer weights and runs from them.

The float weight never lives in the module: each forward unpacks the codes and applies the scales,
then multiplies. On a GPU, fused kernels (Marlin, ExLlama) do this inside the matmul and win because
decode is memory-bound: reading 4-bit weights moves 4x fewer bytes than fp16. In plain PyTorch on a CPU
the unpacking is extra work, so expect *less* speed, but 8x less memory for the weights. Pass
cache=True to keep the dequantized weight around (fast, but then memory is back to float).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packing import dequantize_gptq, pack_gptq, unpack_rows
from .primitives import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_groups: int,
        bias: bool = False,
        cache: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.cache = (
            in_features,
            out_features,
            bits,
            cache,
        )
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16) if bias else None
        )
        self._cached = None

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, cache: bool = False
    ):
        out_f, in_f = qw.q.shape
        layer = cls(in_f, out_f, qw.bits, qw.scale.shape[1], bias is not None, cache)
        for name, t in pack_gptq(qw.q, qw.zero, qw.scale, qw.g_idx, qw.bits).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight [out, in]. Without act-order the groups are contiguous runs of columns, so the
        scales broadcast over a reshape instead of being gathered per column (several times faster)."""
        n_groups = self.scales.shape[0]
        if self.in_features % n_groups == 0 and torch.equal(
            self.g_idx,
            torch.arange(self.in_features, device=self.g_idx.device, dtype=torch.int32)
            // (self.in_features // n_groups),
        ):
            q = unpack_rows(self.qweight, self.bits, self.in_features)  # [in, out]
            zero = (unpack_rows(self.qzeros.t().contiguous(), self.bits, self.out_features) + 1) & (
                2**self.bits - 1
            )
            w = (
                q.view(n_groups, -1, self.out_features).float() - zero.t()[:, None, :].float()
            ) * self.scales.float()[:, None, :]
            return w.view(self.in_features, self.out_features).t()
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cached is not None:
            w = self._cached
        else:
            w = self.dequantize_weight().to(x.dtype)
            if self.cache:
                self._cached = w
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groups={self.scales.shape[0]}, bias={self.bias is not None}"
        )
