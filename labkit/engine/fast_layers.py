"""Fewer, bigger matmuls and fewer small ops per layer: the model runner's decoder layer, built once.

A decode step on a small model is a long chain of small operations, so per-op overhead and how a weight
streams through the caches matter as much as FLOPs. Standard tricks (nano-vllm and vLLM use the first two
for every model):
- fuse the projections that read the same input: q, k and v become one [q+k+v, hidden] matmul, gate and up
  one [2 x mlp, hidden] matmul; 7 matmuls per layer become 4;
- on a CPU, let oneDNN re-lay each fused weight out once into its blocked format (`prepacked_linear`),
  called through labkit's own op where it is built (onednn_linear.py: a ready primitive per row count);
  from two rows up that is the faster path everywhere we measured. One row (batch-1 decode) only streams
  the weight, and which library streams it faster depends on the CPU: plain `F.linear` (MKL) was 25% faster
  than oneDNN on an Intel Xeon, and half as fast on an AMD EPYC (MKL's matrix-vector code is tuned for
  Intel's chips). So `choose_one_row_path` times both on the model's own weights when the runner is built
  and keeps the faster, as cuDNN's benchmark mode does;
- the same fusion for 4-/8-bit QuantLinears that share a fast kernel (one packed weight, one activation
  conversion to bfloat16 instead of three);
- RMSNorm as one fused op (`F.rms_norm`); the rotary cos/sin as a table lookup by position, applied to q
  and k together in 4 ops (`rotate`).
Anything this does not recognise (QuantLinears without one shared fast kernel, another norm, a dynamic
rotary scaling) keeps running through the model's own module, so the runner works on every model it
worked on before.
"""

import itertools
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..matvec import matvec, use_matvec
from ..quant.qlinear import QuantLinear, fused_kernel
from . import onednn_linear

KNOWN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
STATIC_ROPE = {"default", "linear", "llama3"}  # cos/sin depend on the position only: a table works


def prepacked_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable | None:
    """x -> x @ weight.T + bias through oneDNN's pre-packed (blocked) weight layout, measured 10-40% faster
    than `F.linear` here from a few rows up (vLLM's CPU backend packs every linear this way). float32, and
    bfloat16 where the CPU has bfloat16 instructions. The packed copy is a snapshot: build the engine after
    changing weights. None where this does not apply or disagrees."""
    low_precision = weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not (
        weight.device.type == "cpu"
        and (weight.dtype == torch.float32 or low_precision)
        and torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        if onednn_linear.available():  # the same kernel, called without PyTorch's per-call overhead
            run: Callable = onednn_linear.OneDNNLinear(weight, bias)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

            def run(x):
                return torch.ops.mkldnn._linear_pointwise(
                    x.contiguous(), packed, bias, "none", [], ""
                )

        x = torch.randn(3, weight.shape[1]).to(weight.dtype)
        tolerance = 2e-2 if low_precision else 1e-4  # bfloat16 keeps 8 significant bits
        if not torch.allclose(run(x), F.linear(x, weight, bias), rtol=tolerance, atol=tolerance):
            return None
        return run
    except (RuntimeError, AttributeError):  # a torch build without these ops: plain linear it is
        return None


# PackedLinears by handle, for the compiled step's `labkit::packed_linear` op (weakly: an engine that is
# dropped takes its packed weights with it)
_PACKED: "weakref.WeakValueDictionary[int, PackedLinears]" = weakref.WeakValueDictionary()
_handles = itertools.count()


@torch.library.custom_op("labkit::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x [rows, in] through the pre-packed oneDNN weight of PackedLinears `handle`: an opaque call inside a
    compiled graph (the packed weight is a oneDNN tensor that torch.compile cannot trace)."""
    return _PACKED[handle].packed(x)


@packed_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


class PackedLinears:
    """Plain `nn.Linear`s that read the same input, run as one concatenated, pre-packed weight:
    x [rows, in] -> one [rows, out_i] per module. With one row, `one_row_packed` picks the packed copy or
    the modules' own weights (`F.linear`); `choose_one_row_path` sets it from a timing. Inside a compiled
    step on a CPU one row takes neither: each module's weight is streamed by a reduction Inductor generates
    (labkit/matvec.py); more rows run the packed copy through the `labkit::packed_linear` op."""

    def __init__(self, modules: list, packed: Callable):
        self.modules, self.packed = modules, packed
        self.sizes = [m.out_features for m in modules]
        self.in_features = modules[0].in_features
        self.one_row_packed = False
        self.pad_one_row = False  # batch-invariant mode: one row runs as two (make_batch_invariant)
        self.handle = next(_handles)
        _PACKED[self.handle] = self

    def __call__(self, x: torch.Tensor) -> tuple:
        if x.shape[0] == 1 and self.pad_one_row:
            return tuple(out[:1] for out in self(x.expand(2, -1)))
        if use_matvec(x):  # one row in a compiled step on a CPU: streamed (labkit/matvec.py)
            return tuple(matvec(m.weight, x, m.bias) for m in self.modules)
        if x.shape[0] == 1 and not self.one_row_packed:
            return tuple(m(x) for m in self.modules)
        if torch.compiler.is_compiling() and not isinstance(
            self.packed, onednn_linear.OneDNNLinear
        ):
            out = torch.ops.labkit.packed_linear(x, self.handle, sum(self.sizes))
        else:
            out = self.packed(x)
        return (out,) if len(self.modules) == 1 else out.split_with_sizes(self.sizes, dim=-1)


ONE_ROW_PATHS = {False: "F.linear (module weights)", True: "oneDNN (pre-packed)"}
ONE_ROW_PADDED = "oneDNN (pre-packed), one row padded to two (batch-invariant)"


@torch.inference_mode()
def choose_one_row_path(linears: list[PackedLinears], rounds: int = 3) -> str | None:
    """Time one row through every pre-packed linear of the model, both ways, and keep the faster path for
    batch-1 decode. A sweep over all of them reads the whole model, as a decode step does (more bytes than
    any cache holds, for a real model), and the two paths alternate so that load hits both alike.
    Returns the chosen path's name (ONE_ROW_PATHS), None when there is nothing to choose."""
    if not linears:
        return None
    dtype = linears[0].modules[0].weight.dtype
    inputs = [torch.randn(1, lin.in_features, dtype=dtype) for lin in linears]
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for packed in best:
            for lin in linears:
                lin.one_row_packed = packed
            start = time.perf_counter()
            for lin, x in zip(linears, inputs):
                lin(x)
            best[packed] = min(best[packed], time.perf_counter() - start)
    choice = best[True] < best[False]
    for lin in linears:
        lin.one_row_packed = choice
    return ONE_ROW_PATHS[choice]


def make_batch_invariant(linears: list[PackedLinears]) -> str | None:
    """Every row count through the same many-row kernel: the batch-invariant choice. A one-row product
    (MKL's matrix-vector code, and oneDNN's through PyTorch's `_linear_pointwise` for the 1536-wide down
    projection) sums in another order than the many-row GEMM, so a sequence alone got logits 1e-5 apart
    from the same sequence in a batch. oneDNN's packed GEMM gave bit-identical rows from 2 to 2,048 rows
    for every SmolLM2 shape, so one row runs padded to two (through labkit's own oneDNN op, onednn_linear.py,
    one row measured bit-identical already; the padding keeps both paths invariant).
    tests/test_batch_invariance.py checks it on your CPU."""
    for lin in linears:
        lin.pad_one_row = True
    return ONE_ROW_PADDED if linears else None


def fused_linear(modules: list) -> Callable:
    """One callable x -> tuple of each module's output. Plain `nn.Linear`s are concatenated into one weight
    (and pre-packed on a CPU); QuantLinears with the same fast kernel into one packed low-bit weight;
    anything else is called one by one."""
    sizes = [m.out_features for m in modules]
    fused = (
        fused_kernel(modules) if len(modules) > 1 else None
    )  # None unless all share a low-bit kernel
    if fused is not None:
        return lambda x: fused(x).split_with_sizes(sizes, dim=-1)
    if not all(type(m) is torch.nn.Linear for m in modules):
        for m in modules:  # a QuantLinear builds its kernel lazily: now, not inside a compiled step
            if isinstance(m, QuantLinear):
                m.kernel()
        return lambda x: tuple(m(x) for m in modules)
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat(
            [
                m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                for m in modules
            ]
        )
    packed = prepacked_linear(weight, bias)
    if packed is None:
        if len(modules) == 1:
            return lambda x: (F.linear(x, weight, bias),)
        return lambda x: F.linear(x, weight, bias).split_with_sizes(sizes, dim=-1)
    return PackedLinears(modules, packed)


def fast_rms_norm(norm) -> Callable:
    if type(norm).__name__ in KNOWN_RMS_NORMS and hasattr(norm, "variance_epsilon"):
        weight, eps = norm.weight.detach(), norm.variance_epsilon
        return lambda x: F.rms_norm(x, weight.shape, weight, eps)
    return norm


class RotaryTable:
    """cos/sin for every position up to the context, computed once by the model's own rotary module, and
    shaped for `rotate`: each [T, 1, head_dim], sin with rotate-half's sign folded in (see `rotate`)."""

    def __init__(self, rotary_emb, max_positions: int, dtype, device):
        self.rotary_emb = rotary_emb
        self.table = None
        if getattr(rotary_emb, "rope_type", "default") in STATIC_ROPE:
            pos = torch.arange(max_positions, device=device)[None]
            cos, sin = rotary_emb(torch.zeros(1, dtype=dtype, device=device), pos)
            self.table = (cos[0], signed(sin[0]))

    def __call__(self, hidden, positions) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None:
            cos, sin = self.table[0][positions], self.table[1][positions]
        else:
            cos, sin = self.rotary_emb(hidden, positions[None])
            cos, sin = cos[0], signed(sin[0])
        # [T, 1, head_dim]: one row per token, shared by every head
        return cos[:, None], sin[:, None]


def signed(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated: rotate-half's minus sign, folded in once."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [T, heads, D] (cos, signed_sin [T, 1, D] from RotaryTable).
    Llama's  x * cos + rotate_half(x) * sin,  with rotate_half(x) = cat(-x2, x1), is a roll of x by half
    its width with the first half negated; with the sign folded into sin it is two multiplies, one roll
    and an add: 4 ops instead of about 9, and bit for bit the same result ((-a) * b == a * (-b))."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class FastLayer:
    """A decoder layer's weights, regrouped for the runner: qkv(x) -> (q, k, v), o(x), mlp(x).
    `linears` lists its fused projections and `packed` those pre-packed, for `choose_one_row_path`."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.input_norm = fast_rms_norm(layer.input_layernorm)
        self.post_norm = fast_rms_norm(layer.post_attention_layernorm)
        self.qkv = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = fused_linear([attn.o_proj])
        # (fused projection, its input width), in the order a step runs them
        self.linears = [(self.qkv, attn.q_proj.in_features), (self.o, attn.o_proj.in_features)]
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gate_up, down, act = (
                fused_linear([mlp.gate_proj, mlp.up_proj]),
                fused_linear([mlp.down_proj]),
                mlp.act_fn,
            )
            self.linears += [
                (gate_up, mlp.gate_proj.in_features),
                (down, mlp.down_proj.in_features),
            ]

            def run_mlp(x):
                gate, up = gate_up(x)
                return down(act(gate) * up)[0]

            self.mlp = run_mlp
        else:
            self.mlp = mlp
        self.packed = [lin for lin, _ in self.linears if isinstance(lin, PackedLinears)]


def decoder_layer(runner, i: int, layer, hidden, cos, sin, attend, lora) -> torch.Tensor:
    """hidden [T, hidden] through decoder layer i (a FastLayer): pre-norm attention, then the MLP, each
    added to the residual."""
    T, D, H, Hkv = (
        hidden.shape[0],
        runner.shape.head_dim,
        runner.num_heads,
        runner.shape.num_kv_heads,
    )
    attn = layer.attn
    x = layer.input_norm(hidden)
    q, k, v = layer.qkv(x)
    if lora is not None:
        q, k, v = (
            runner.adapt(lora, i, m, x, y)
            for m, y in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))
        )
    q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    qk = rotate(torch.cat((q, k), dim=1), cos, sin)  # [T, H + Hkv, D]: both in one pass
    out = attend(i, qk[:, :H], qk[:, H:], v).reshape(T, H * D)
    o = layer.o(out)[0]
    if lora is not None:
        o = runner.adapt(lora, i, "o_proj", out, o)
    hidden = hidden + o
    return hidden + layer.mlp(layer.post_norm(hidden))
