"""Post-training INT8 quantization of weights *and* activations, three ways.

- Dynamic: weights are stored int8 once; each activation tensor gets its scale computed on the fly
  (from its own min/max) when it arrives. No calibration, little error, some per-call overhead.
- Static: activation scales are fixed ahead of time from calibration data (observers record ranges),
  so inference does no range computation, but unusual inputs can saturate.
- Weight-only: int8 weights, float activations (what labkit's RTN does at 8 bits).

PyTorch's original toolkit for this, `torch.ao.quantization` (quantize_dynamic, prepare/convert), still
runs on CPU in torch 2.x but is deprecated in favour of torchao, whose one entry point is
`quantize_(model, config)`. We show both. torchao lives in the production-library environment
(.venv-quant): in this course's main environment its import would print CUDA-library warnings on
every model load, so the notebook runs it there (see libs.py).
"""

import copy
import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .layers import find_blocks, find_linears


def dynamic_int8(model) -> nn.Module:
    """torch.ao dynamic quantization (int8, per-channel weights) of the decoder blocks' linears, in a copy.

    The output head is left in float: it is tied to the embedding, and quantizing a copy of it would
    store the matrix twice.
    """
    qmodel = copy.deepcopy(model)
    blocks_name, blocks = find_blocks(qmodel)
    names = {
        f"{blocks_name}.{name}" for name, m in blocks.named_modules() if isinstance(m, nn.Linear)
    }
    with warnings.catch_warnings():
        # torch.ao's deprecation notice: we know, and say so in the notebook
        warnings.simplefilter("ignore")
        # one weight scale per output channel
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(
            qmodel, {name: qconfig for name in names}, dtype=torch.qint8
        )


class _Observed(nn.Module):
    """QuantStub -> Linear -> DeQuantStub: eager-mode static quantization around one linear at a time."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.quant, self.linear, self.dequant = (
            torch.ao.quantization.QuantStub(),
            linear,
            torch.ao.quantization.DeQuantStub(),
        )

    def forward(self, x):
        return self.dequant(self.linear(self.quant(x)))


@torch.no_grad()
def static_int8(
    model, calib: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> nn.Module:
    """torch.ao static quantization: observers record each linear's input range on calibration data,
    then convert swaps in int8 kernels (x86/fbgemm) with those fixed activation scales.

    Eager mode needs explicit quantize/dequantize points: we wrap every linear of the decoder blocks,
    so norms, attention and activations stay float (the usual "int8 linears" recipe).
    """
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    qmodel = copy.deepcopy(model).cpu()
    _, blocks = find_blocks(qmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = (
            "x86"
            if "x86" in torch.backends.quantized.supported_engines
            else torch.backends.quantized.supported_engines[-1]
        )
        # per-channel weights, histogram observer
        qconfig = get_default_qconfig(torch.backends.quantized.engine)
        for block in blocks:
            for name, lin in list(find_linears(block).items()):
                parent_name, _, child = name.rpartition(".")
                wrapper = _Observed(lin)
                wrapper.qconfig = qconfig
                setattr(block.get_submodule(parent_name) if parent_name else block, child, wrapper)
        prepare(qmodel, inplace=True)
        for i in tqdm(
            range(0, len(calib), batch_size), desc="calibrating", disable=not progress, leave=False
        ):
            qmodel(input_ids=calib[i : i + batch_size], use_cache=False)
        convert(qmodel, inplace=True)
    return qmodel
