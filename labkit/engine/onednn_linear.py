"""Linear layers through oneDNN directly: the packed-weight matmul without PyTorch's per-call overhead.

On a CPU every float linear layer of the engine runs oneDNN's matmul on a weight re-laid out once into
oneDNN's blocked format (fast_layers.prepacked_linear). PyTorch reaches that kernel through
`torch.ops.mkldnn._linear_pointwise`, which describes the tensors to oneDNN and looks its primitive up in a
cache on every call: about 10 us before any arithmetic (a 64 x 64 product at 16 rows: 15 us, against 5 us
through a primitive that is kept ready). A decode step of SmolLM2 calls a linear layer 121 times (four per
layer and the output head), so that is over a millisecond a step, 2-5% of a step at 2 to 32 sequences.
vLLM's CPU backend keeps a ready primitive per linear layer and row count for this reason (its
csrc/cpu/dnnl_helper, `onednn_mm`), in C++ against its own build of oneDNN.

csrc/onednn_linear.cpp does the same against the oneDNN that Intel publishes on PyPI (`onednn-cpu-gomp`,
its headers in `onednn-devel-cpu-gomp`; PyTorch's own copy of oneDNN is linked in privately and cannot be
called). `pack(weight)` returns the blocked weight as a tensor of bytes that Python owns; `linear(x, packed,
bias, out_features)` runs the matmul. Same kernel, same sums: its outputs equal `_linear_pointwise`'s bit
for bit (tests/test_onednn_linear.py). Measured (one thread, every SmolLM2 linear once, paired in one
process): 16 rows 42.3 vs 44.8 ms, 32 rows 80.3 vs 83.0, 2 rows 16.7 vs 20.0; level from 64 rows up.

It is built on first use (labkit/native.py; about 20 s). Where it is not available (no compiler, the
oneDNN wheels missing, a CPU other than x86-64, or LABKIT_NO_ONEDNN=1) the engine calls
`_linear_pointwise` as before: nothing needs this, it only makes each call cheaper.
"""

import os
import sysconfig
from functools import cache
from pathlib import Path

import torch

from .. import native
from ..paths import REPO_ROOT

SOURCE = REPO_ROOT / "labkit" / "engine" / "csrc" / "onednn_linear.cpp"
DISABLE = "LABKIT_NO_ONEDNN"  # set to 1: PyTorch's _linear_pointwise everywhere


def onednn_prefix() -> Path | None:
    """Where pip put oneDNN's headers and library (the environment's data directory), or None."""
    prefix = Path(sysconfig.get_paths()["data"])
    found = (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any(
        (prefix / "lib").glob("libdnnl.so*")
    )
    return prefix if found else None


@cache
def available() -> bool:
    """Are the ops built and loaded (now, the first time)? False without the oneDNN wheels, a C++ compiler
    or ninja, when the build fails (with a warning), or with LABKIT_NO_ONEDNN=1."""
    prefix = onednn_prefix()
    if os.environ.get(DISABLE) == "1" or prefix is None:
        return False
    what = "linear layers call oneDNN through PyTorch's _linear_pointwise"
    include, lib = prefix / "include", prefix / "lib"
    ldflags = (f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}")
    if not native.build("labkit_onednn", SOURCE, [f"-I{include}"], what, DISABLE, ldflags):
        return False
    torch.library.register_fake("labkit_onednn::linear")(_linear_shape)
    return True


class OneDNNLinear:
    """x [rows, in] -> x @ weight.T + bias [rows, out], through a weight packed once. Callable in eager
    code and inside a compiled graph alike (the packed weight is a plain tensor the graph takes)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if not available():
            raise RuntimeError(
                f"labkit's oneDNN op is not built here (it needs x86-64 Linux with the onednn-cpu-gomp and "
                f"onednn-devel-cpu-gomp wheels, a C++ compiler and ninja, and {DISABLE} unset): check "
                "onednn_linear.available() first, or use fast_layers.prepacked_linear, which falls back"
            )
        self.packed = torch.ops.labkit_onednn.pack(weight.detach())  # [bytes] uint8
        self.bias = None if bias is None else bias.detach().contiguous()
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.labkit_onednn.linear(x, self.packed, self.bias, self.out_features)


def _linear_shape(x, packed, bias, out_features):
    return x.new_empty(x.shape[0], out_features)
