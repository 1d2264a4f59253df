"""Folding per-channel scales into the op before a linear: the exact identity AWQ and SmoothQuant share.

For a per-input-channel scale s > 0,

    W x = (W diag(s)) (diag(s)^-1 x)

so multiplying a linear's input columns by s and dividing whatever produced x by s changes nothing in
float. The division costs nothing at inference because it is folded into the previous op: a LayerNorm /
RMSNorm weight (its output is x_hat * weight), or the output rows of the previous linear. AWQ picks s to
protect salient weights before low-bit rounding; SmoothQuant picks s to move activation outliers into
the weights before INT8 W8A8. Both call fold_scales on the pairs that scale_groups finds.
"""

import torch
import torch.nn as nn

from .layers import Conv1D, get_weight, set_weight

# (previous op, the linears it feeds) per block, by attribute path. The previous op absorbs 1/s.
SCALE_GROUPS = {
    "llama": [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.o_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),
    ],
    "opt": [
        ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.out_proj"]),
        ("final_layer_norm", ["fc1"]),
    ],
    "gpt2": [("ln_1", ["attn.c_attn"]), ("ln_2", ["mlp.c_fc"])],
}


def scale_groups(block: nn.Module):
    """[(prev_op, {name: linear})] for this block, skipping pairs whose shapes do not line up (GQA's v->o)."""
    for layout in SCALE_GROUPS.values():
        try:
            groups = [
                (block.get_submodule(p), {n: block.get_submodule(n) for n in ls})
                for p, ls in layout
            ]
        except AttributeError:
            continue
        return [
            (prev, lins)
            for prev, lins in groups
            if _out_features(prev) == get_weight(next(iter(lins.values()))).shape[1]
        ]
    raise ValueError(
        f"scale folding (AWQ, SmoothQuant) needs to know which op feeds which linear; {type(block).__name__} is not one of the "
        f"supported layouts {list(SCALE_GROUPS)} (add it to labkit.quant.folding.SCALE_GROUPS)"
    )


def _out_features(op: nn.Module) -> int:
    return get_weight(op).shape[0] if isinstance(op, (nn.Linear, Conv1D)) else op.weight.shape[0]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: dict[str, nn.Module], s: torch.Tensor) -> None:
    """W <- W diag(s) for each linear; prev's output <- prev's output / s. The network's function is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
    elif isinstance(prev, Conv1D):
        prev.weight.div_(s[None, :])
    else:  # LayerNorm / RMSNorm: y = x_hat * weight (+ bias)
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for layer in linears.values():
        set_weight(layer, get_weight(layer) * s[None, :])
