"""Pack a quantized model for real, save it in the GPTQ checkpoint format, and load it back.

The format (AutoGPTQ's, now maintained by GPTQModel) is what vLLM, transformers (through GPTQModel) and
most hubs expect: each quantized linear `name.weight` becomes `name.qweight`, `name.qzeros`,
`name.scales`, `name.g_idx` (see packing.py), everything else is stored in float16, and config.json
carries a `quantization_config` saying how to read it:

    {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128,
     "desc_act": false, "sym": true, "lm_head": false, ...}

group_size -1 means one group per output channel; desc_act true means act-order (g_idx is permuted).
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .gptq import GPTQOptions
from .layers import get_weight, output_head
from .primitives import QuantizedWeight
from .qlinear import QuantLinear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def pack_model(
    model: nn.Module, results: dict[str, QuantizedWeight], cache: bool = False
) -> nn.Module:
    """Swap each quantized linear for a QuantLinear holding only packed codes (in place; returns model)."""
    for name, qw in results.items():
        layer = model.get_submodule(name)
        bias = getattr(layer, "bias", None)
        _replace(
            model,
            name,
            QuantLinear.from_quantized(qw, None if bias is None else bias.detach(), cache).to(
                get_weight(layer).device
            ),
        )
    return model


def _format(results: dict[str, QuantizedWeight]) -> dict:
    kinds = {(qw.bits, qw.symmetric) for qw in results.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"a GPTQ checkpoint has one bit width and one symmetry for all layers, got {kinds}"
        )
    bits, sym = kinds.pop()
    sizes = {qw.group_size if 0 < qw.group_size < qw.q.shape[1] else -1 for qw in results.values()}
    if len(sizes) != 1:
        raise ValueError(f"a GPTQ checkpoint has one group size for all layers, got {sizes}")
    desc_act = any(bool((qw.g_idx[1:] < qw.g_idx[:-1]).any()) for qw in results.values())
    return {"bits": bits, "group_size": sizes.pop(), "desc_act": desc_act, "sym": sym}


def gptq_state_dict(
    model: nn.Module, results: dict[str, QuantizedWeight]
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: packed GPTQ tensors for quantized linears, float16 for the rest."""
    quantized = set(results)
    state = {}
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized and key.endswith(".weight"):
            continue
        state[key] = t.detach().to(torch.float16) if t.is_floating_point() else t.detach()
    for name, qw in results.items():
        layer = QuantLinear.from_quantized(qw)
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            state[f"{name}.{part}"] = getattr(layer, part)
    # one copy of a tied matrix (safetensors insists)
    if getattr(model.config, "tie_word_embeddings", False):
        head = output_head(model)
        if head is not None:
            state.pop(f"{head[0]}.weight", None)
    return {k: v.contiguous().cpu() for k, v in state.items()}


def export_gptq(
    model: nn.Module,
    results: dict[str, QuantizedWeight],
    out_dir,
    tokenizer=None,
    options: GPTQOptions | None = None,
    **loose,
) -> Path:
    """Write a GPTQ checkpoint directory (config.json, model.safetensors, quantize_config.json, tokenizer).

    The bits, group size, symmetry and act-order (desc_act) are read off the codes themselves. options
    (the GPTQOptions the weights were made with; loose: damp=, true_sequential=, static_groups=) only
    describe the recipe: loaders do not need them, but a checkpoint should not misstate it.

    Only the decoder blocks' linears may be quantized: the output head is tied to the embedding here and
    stays float16, as `lm_head: false` tells the loaders.
    """
    head = output_head(model)
    if head is not None and head[0] in results:
        raise ValueError(
            f"{head[0]} is quantized: the GPTQ export keeps the (tied) output head in float16; "
            "quantize without include_head to export"
        )
    if not results:
        raise ValueError("nothing to export: results is empty")
    fmt = _format(results)
    recipe = replace(options or GPTQOptions(), **loose)
    qconfig = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        **fmt,
        "damp_percent": recipe.damp,
        "true_sequential": recipe.true_sequential,
        "static_groups": recipe.static_groups,
        "lm_head": False,
        "pack_dtype": "int32",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(gptq_state_dict(model, results), out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(quantization_config=qconfig, dtype="float16", torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = Path(getattr(model, "name_or_path", "") or "") / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out / gen.name)
    return out


def load_gptq(path, device: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint (ours, or one GPTQModel wrote) into labkit's QuantLinear layers.

    Returns (model, tokenizer). Runs anywhere plain PyTorch runs: no GPTQ kernels needed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or qc.get("quant_method") != "gptq":
        raise ValueError(f"{path} has no GPTQ quantization_config (quant_method 'gptq')")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(
            f"only checkpoint_format 'gptq' (v1) is supported, got {qc.get('checkpoint_format')!r}"
        )
    del config.quantization_config
    bits = qc["bits"]
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        layer = model.get_submodule(name)
        in_f, out_f = get_weight(layer).shape[1], get_weight(layer).shape[0]
        _replace(
            model,
            name,
            QuantLinear(
                in_f, out_f, bits, state[f"{name}.scales"].shape[0], f"{name}.bias" in state
            ),
        )
    # copies convert fp16 -> model dtype
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))
    ]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    from ..device import pick_device

    model.to(pick_device(device)).eval()
    tokenizer = (
        AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    )
    return model, tokenizer
