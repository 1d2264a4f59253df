"""QuantLinear: a linear layer that keeps only packed integer weights and runs from them.

The float weight never lives in the module. Two ways to compute with the codes:
- the reference path (`reference_forward`): unpack the codes, apply the scales, multiply. Readable, exact,
  and slow: it writes and re-reads a full float weight every call, more bytes than fp32 itself;
- a fast kernel (kernels.py) where one exists for these bits and groups on this device: PyTorch's int4 and
  int8 weight-only matmuls, which dequantize inside the matmul, so decode reads 4 or 8 bits per weight
  instead of 32. That is why weight-only quantization makes memory-bound decode faster (notebook 03b).
`forward` takes the fast kernel when there is one (built on first use, from the packed buffers, for the
device the layer is on) and falls back to the reference path otherwise; `kernel_name` says which ran.
Pass fast=False to always unpack, cache=True to keep the dequantized weight (memory back to float).
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import build_kernel
from .packing import dequantize_gptq, pack_gptq, unpack_gptq, unpack_rows
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
        fast: bool = True,
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
        self.fast = fast
        self._kernel: tuple | None = (
            None  # (device, name, callable or None), built by `kernel` on first use
        )

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        cache: bool = False,
        fast: bool = True,
    ):
        out_f, in_f = qw.q.shape
        layer = cls(in_f, out_f, qw.bits, qw.scale.shape[1], bias is not None, cache, fast)
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

    def kernel(self):
        """The fast kernel for the current device, or None. Built once from the packed buffers: after
        changing them (load_state_dict, copy_) call `reset_kernel()`."""
        device = self.qweight.device
        if self._kernel is None or self._kernel[0] != device:
            q, zero, scale, g_idx = unpack_gptq(
                self.qweight, self.qzeros, self.scales, self.g_idx, self.bits
            )
            built = build_kernel(q, zero, scale, g_idx, self.bits, self.bias)
            self._kernel = (device, *(built or ("unpack", None)))
        return self._kernel[2]

    def reset_kernel(self) -> None:
        self._kernel = None

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_kernel()  # new packed buffers: rebuild the kernel on next use
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def kernel_name(self) -> str:
        """'int4pack', 'int8pack' or 'unpack' (the reference path): what `forward` runs."""
        if not self.fast or self.cache:
            return "unpack"
        self.kernel()
        assert self._kernel is not None  # kernel() just built it
        return self._kernel[1]

    def bytes_read(self) -> int:
        """Bytes one forward reads from the weights: the kernel's packed copy, or for the reference path
        the packed buffers plus the float weight it writes and reads back (hence slower than float)."""
        run = self.kernel() if self.fast and not self.cache else None
        if run is not None:
            return run.nbytes
        if self.cache:
            return self.in_features * self.out_features * 4
        packed = (self.qweight, self.qzeros, self.scales)
        return (
            sum(t.numel() * t.element_size() for t in packed)
            + 2 * 4 * self.in_features * self.out_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.kernel() if self.fast and not self.cache else None
        if run is not None:
            return run(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack, scale, multiply: the readable path every kernel is tested against."""
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
            f"groups={self.scales.shape[0]}, bias={self.bias is not None}, "
            f"kernel={self._kernel[1] if self._kernel else 'not built yet'}"
        )


def fused_kernel(layers: list["QuantLinear"]) -> Callable | None:
    """One fast kernel for several QuantLinears that read the same input (q/k/v; gate/up): their codes
    stacked along the output dimension, so a decode step converts the activation once and runs one
    matmul instead of three (the split is the caller's). None where the layers' kernels differ (bits,
    groups, act-order) or no kernel applies: then each layer runs its own forward."""
    first = layers[0]
    if not all(
        isinstance(m, QuantLinear)
        and m.fast
        and not m.cache
        and m.bits == first.bits
        and m.in_features == first.in_features
        and m.scales.shape[0] == first.scales.shape[0]
        and torch.equal(m.g_idx, first.g_idx)
        and m.kernel() is not None
        for m in layers
    ):
        return None
    parts = [unpack_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits) for m in layers]
    q, zero, scale = (torch.cat([p[i] for p in parts]) for i in range(3))  # each [sum(out), ...]
    bias = None
    if any(m.bias is not None for m in layers):
        bias = torch.cat(
            [m.bias if m.bias is not None else m.scales.new_zeros(m.out_features) for m in layers]
        ).float()
    built = build_kernel(q, zero, scale, first.g_idx, first.bits, bias)
    return None if built is None else built[1]
