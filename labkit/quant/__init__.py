"""labkit.quant: quantization built from scratch, one idea per file.

scheme.py      QuantScheme: bits, group size, granularity, symmetric, act-order, checked against a model
primitives.py  quantize/dequantize, symmetric/asymmetric, per-tensor/channel/group, any 2-8 bits
packing.py     b-bit codes packed into int32 words (the GPTQ layout)
qlinear.py     QuantLinear: a linear layer that runs from packed weights
kernels.py     the fast int4/int8 matmuls QuantLinear runs through (PyTorch's int4pack/int8pack ops)
layers.py      finding blocks and linears, reading and writing their weights, untying the output head
calibration.py capturing what flows into them: hooks, calibration passes, block-by-block inputs
rtn.py         round-to-nearest, the baseline
gptq.py        GPTQ (Hessian, damping, Cholesky, lazy blocks, groups, act-order)
folding.py     folding per-channel scales into the previous op (shared by AWQ and SmoothQuant)
awq.py         AWQ (activation-aware scale search folded into the previous op, clipping search)
ptq.py         INT8 dynamic and static quantization with torch.ao
w8a8.py        W8A8 fake quantization (INT8/FP8, per-tensor/per-token activations), LLM.int8() decomposition
smoothquant.py SmoothQuant: activation ranges, smoothing scales folded in, checked to keep the function
int8_gemm.py   real INT8 matmuls (torch._int_mm, fbgemm) timed against float32
qat.py         quantization-aware training: fake-quant linears, straight-through estimator, distillation
export.py      pack, save and load checkpoints in the GPTQ format (vLLM, transformers, GPTQModel)
reference.py   a float model's logits computed once, to compare many quantized variants against it
libs.py        the production libraries (GPTQModel, llm-compressor, torchao), run by labkit.workers
"""

from .awq import AWQOptions, awq_quantize_model
from .export import export_gptq, load_gptq, pack_model
from .gptq import GPTQOptions, gptq_quantize_model, gptq_quantize_weight
from .packing import pack_rows, unpack_rows
from .primitives import (
    QuantizedWeight,
    dequantize_asymmetric,
    dequantize_symmetric,
    fake_quantize,
    quantization_error,
    quantize_asymmetric,
    quantize_symmetric,
    quantize_weight,
)
from .qlinear import QuantLinear
from .rtn import rtn_quantize_model
from .scheme import QuantScheme

__all__ = [
    "AWQOptions",
    "GPTQOptions",
    "QuantScheme",
    "awq_quantize_model",
    "export_gptq",
    "load_gptq",
    "pack_model",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "pack_rows",
    "unpack_rows",
    "QuantizedWeight",
    "dequantize_asymmetric",
    "dequantize_symmetric",
    "fake_quantize",
    "quantization_error",
    "quantize_asymmetric",
    "quantize_symmetric",
    "quantize_weight",
    "QuantLinear",
    "rtn_quantize_model",
]
