"""Fewer, bigger matmuls and fewer small ops per layer: the model runner's decoder layer, built once.

A decode step on a small model is a long chain of small operations, so per-op overhead and how a weight
streams through the caches matter as much as FLOPs. Standard tricks (nano-vllm and vLLM use the first two
for every model):
- fuse the projections that read the same input: q, k and v become one [q+k+v, hidden] matmul, gate and up
  one [2 x mlp, hidden] matmul; 7 matmuls per layer become 4;
- on a CPU, let oneDNN re-lay each fused weight out once into its blocked format (`prepacked_linear`),
  used from two rows up: one row (batch-1 decode) only streams the weight, and plain `F.linear` does that best;
- the same fusion for 4-/8-bit QuantLinears that share a fast kernel (one packed weight, one activation
  conversion to bfloat16 instead of three);
- RMSNorm as one fused op (`F.rms_norm`) and the rotary cos/sin as a table lookup by position.
Anything this does not recognise (QuantLinears without one shared fast kernel, another norm, a dynamic
rotary scaling) keeps running through the model's own module, so the runner works on every model it
worked on before.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..quant.qlinear import fused_kernel

KNOWN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
STATIC_ROPE = {"default", "linear", "llama3"}  # cos/sin depend on the position only: a table works


def prepacked_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable | None:
    """x -> x @ weight.T + bias through oneDNN's pre-packed (blocked) weight layout, measured 10-40% faster
    than `F.linear` here from a few rows up (vLLM's CPU backend packs every linear this way). The packed copy
    is a snapshot: build the engine after changing weights. None where this does not apply or disagrees."""
    if not (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

        def run(x):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

        x = torch.randn(3, weight.shape[1])
        if not torch.allclose(run(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
            return None
        return run
    except (RuntimeError, AttributeError):  # a torch build without these ops: plain linear it is
        return None


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

    def run(x):
        # One row (batch-1 decode) is a pure read of the weight: the packed layout's blocking buys nothing
        # there and measured ~25% slower than F.linear, so one row reads the modules' own weights (no copy).
        if x.shape[0] == 1:
            return tuple(m(x) for m in modules)
        out = packed(x)
        return (out,) if len(modules) == 1 else out.split_with_sizes(sizes, dim=-1)

    return run


def fast_rms_norm(norm) -> Callable:
    if type(norm).__name__ in KNOWN_RMS_NORMS and hasattr(norm, "variance_epsilon"):
        weight, eps = norm.weight.detach(), norm.variance_epsilon
        return lambda x: F.rms_norm(x, weight.shape, weight, eps)
    return norm


class RotaryTable:
    """cos/sin for every position up to the context, computed once by the model's own rotary module."""

    def __init__(self, rotary_emb, max_positions: int, dtype, device):
        self.rotary_emb = rotary_emb
        self.table = None
        if getattr(rotary_emb, "rope_type", "default") in STATIC_ROPE:
            pos = torch.arange(max_positions, device=device)[None]
            cos, sin = rotary_emb(torch.zeros(1, dtype=dtype, device=device), pos)
            self.table = (cos[0], sin[0])

    def __call__(self, hidden, positions):
        if self.table is not None:
            return self.table[0][positions], self.table[1][positions]
        cos, sin = self.rotary_emb(hidden, positions[None])
        return cos[0], sin[0]


class FastLayer:
    """A decoder layer's weights, regrouped for the runner: qkv(x) -> (q, k, v), o(x), mlp(x)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.input_norm = fast_rms_norm(layer.input_layernorm)
        self.post_norm = fast_rms_norm(layer.post_attention_layernorm)
        self.qkv = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = fused_linear([attn.o_proj])
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gate_up, down, act = (
                fused_linear([mlp.gate_proj, mlp.up_proj]),
                fused_linear([mlp.down_proj]),
                mlp.act_fn,
            )

            def run_mlp(x):
                gate, up = gate_up(x)
                return down(act(gate) * up)[0]

            self.mlp = run_mlp
        else:
            self.mlp = mlp
