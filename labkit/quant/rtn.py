"""Round-to-nearest (RTN): quantize every weight on its own, no data needed. The baseline to beat."""

import torch

from .layers import get_weight, quantizable_layers, set_weight
from .primitives import QuantizedWeight, quantize_weight


@torch.no_grad()
def rtn_quantize_model(
    model,
    bits: int = 4,
    group_size: int | None = 128,
    granularity: str = "group",
    symmetric: bool = True,
    include_head: bool = False,
) -> dict[str, QuantizedWeight]:
    """Quantize every linear in the decoder blocks (and the output head if asked) in place.

    The model keeps float weights holding the dequantized values ("fake quantization"), so it runs
    and evaluates as usual; the returned codes can be packed (pack_model) or exported (export_gptq).
    """
    results = {}
    for _, linears in quantizable_layers(model, include_head):
        for name, layer in linears.items():
            qw = quantize_weight(get_weight(layer), bits, symmetric, granularity, group_size)
            set_weight(layer, qw.dequantize())
            results[name] = qw
    return results
