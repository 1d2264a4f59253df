"""A transformer's quantizable layers, as layer-wise quantizers see them: blocks, linears, the output head.

GPTQ and AWQ quantize one decoder block at a time. We find the blocks (the longest ModuleList:
`model.layers` in Llama, `transformer.h` in GPT-2), the linear layers inside them (nn.Linear, and GPT-2's
Conv1D, which stores its weight transposed), read and write their weights as [out, in] whatever the layer
type, and give a tied output head its own weight when it is to be quantized too.
"""

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear: y = x @ W + b with W [in, out]

from .scheme import QuantScheme, fitting_group_sizes

LINEAR_TYPES = (nn.Linear, Conv1D)


def find_blocks(model) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the repeated decoder blocks: the ModuleList with the most parameters."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError("could not find the model's decoder blocks (no nn.ModuleList)")
    return best[0], best[1]


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {
        f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)
    }


def output_head(model) -> tuple[str, nn.Module] | None:
    """The output projection (lm_head), which in the course model shares its weight with the embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, m in model.named_modules():
        if m is head:
            return name, m
    return None


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever the layer type (a copy for Conv1D)."""
    w = layer.weight.data
    return w.t() if isinstance(layer, Conv1D) else w


def set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write a [out, in] weight back in place (in place, so a tied embedding sees the same values)."""
    if isinstance(layer, Conv1D):
        w = w.t()
    layer.weight.data.copy_(w.to(layer.weight.dtype))


@torch.no_grad()
def untie_output_head(model) -> tuple[str, nn.Module]:
    """Give the output head its own copy of a weight tied to the input embedding; return (name, head).

    Quantizing the head then changes only the output projection: the embedding lookup keeps its float
    weights (one row per token read, so it costs no compute), as GPTQModel and llm-compressor do for
    lm_head. The price is storing both matrices.
    """
    head = output_head(model)
    if head is None:
        raise ValueError("this model has no output embedding layer to quantize")
    name, layer = head
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight is layer.weight:
        layer.weight = nn.Parameter(
            layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
        )
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    return name, layer


def quantizable_layers(
    model, include_head: bool = False
) -> list[tuple[int | None, dict[str, nn.Module]]]:
    """[(block index, {full name: linear})] in forward order; the output head (block None, untied) last if asked."""
    blocks_name, blocks = find_blocks(model)
    out: list[tuple[int | None, dict[str, nn.Module]]] = [
        (i, find_linears(block, f"{blocks_name}.{i}.")) for i, block in enumerate(blocks)
    ]
    if include_head:
        name, head = untie_output_head(model)
        out.append((None, {name: head}))
    return out


def layer_in_features(model, include_head: bool = False) -> dict[str, int]:
    """{name: in_features} of every linear a quantizer would touch (the head only if asked)."""
    blocks_name, blocks = find_blocks(model)
    layers = {
        n: m
        for i, b in enumerate(blocks)
        for n, m in find_linears(b, f"{blocks_name}.{i}.").items()
    }
    head = output_head(model) if include_head else None
    if head is not None:
        layers[head[0]] = head[1]
    return {name: get_weight(m).shape[1] for name, m in layers.items()}


def valid_group_sizes(model, include_head: bool = False) -> list[int]:
    """The common group sizes that divide every quantized layer's in_features (SmolLM2: 32 and 64)."""
    return fitting_group_sizes(layer_in_features(model, include_head).values())


def check_scheme(model, scheme: QuantScheme, include_head: bool = False) -> None:
    """The scheme against every layer a quantizer would touch, before any work (QuantScheme.check_layers)."""
    scheme.check_layers(layer_in_features(model, include_head))


def check_group_size(model, group_size, granularity: str = "group", include_head: bool = False):
    """check_scheme for a bare group size and granularity (the form from before QuantScheme)."""
    check_scheme(model, QuantScheme(group_size=group_size, granularity=granularity), include_head)
