"""Round-to-nearest (RTN): quantize every weight on its own, no data needed. The baseline to beat."""

import torch

from .layers import check_scheme, get_weight, quantizable_layers, set_weight
from .primitives import QuantizedWeight, quantize_weight
from .scheme import QuantScheme, as_scheme


@torch.no_grad()
def rtn_quantize_model(
    model,
    bits: QuantScheme | int = 4,
    group_size: int | None = 128,
    granularity: str = "group",
    symmetric: bool = True,
    include_head: bool = False,
) -> dict[str, QuantizedWeight]:
    """Quantize every linear in the decoder blocks (and the output head if asked) in place:
    rtn_quantize_model(model, QuantScheme(4, 64)), or the loose form rtn_quantize_model(model, 4, 64).

    The model keeps float weights holding the dequantized values ("fake quantization"), so it runs
    and evaluates as usual; the returned codes can be packed (pack_model) or exported (export_gptq).
    """
    scheme = as_scheme(bits, group_size=group_size, granularity=granularity, symmetric=symmetric)
    check_scheme(model, scheme, include_head)
    results = {}
    for _, linears in quantizable_layers(model, include_head):
        for name, layer in linears.items():
            qw = quantize_weight(get_weight(layer), scheme)
            set_weight(layer, qw.dequantize())
            results[name] = qw
    return results
