"""Run a production quantization library on the course model: a worker for the .venv-quant environment.

Started by quant_client.run_library (see client.py and protocol.py). Each request is
{"task": TASK, option: value, ...}, with the options (and their defaults) in OPTIONS; the answer is
what the task measured. TASK: gptqmodel-gptq | gptqmodel-awq | llmcompressor-gptq | llmcompressor-awq
| torchao-int8 | load-export | logits-export. It uses labkit's own calibration and evaluation code,
so its numbers are comparable with labkit's methods measured in the main environment.
"""

import copy
import os
import time
from types import SimpleNamespace

import torch

from labkit.data import calibration_batches, heldout_ids
from labkit.evaluate import evaluate_lm
from labkit.model import load_model, resolve_model_name
from labkit.workers.protocol import serve


def _calib(tok, a):
    return calibration_batches(tok, a.n_samples, a.seq_len, a.seed)


def _metrics(model, ref, tok, a) -> dict:
    ids = heldout_ids(tok, a.eval_tokens or None)  # 0 = the whole held-out split
    return evaluate_lm(model, ids, reference=ref)


def gptqmodel_quantize(a, method: str) -> dict:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    path = resolve_model_name(a.model)
    ref, tok = load_model(a.model, device="cpu")
    calib = [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in _calib(tok, a)
    ]
    kw = dict(
        bits=a.bits, group_size=a.group_size, sym=True, desc_act=a.act_order, damp_percent=a.damp
    )
    if method == "awq":
        from gptqmodel.quantization import METHOD

        kw.update(quant_method=METHOD.AWQ, desc_act=False)
    else:  # say every choice, so both sides of a comparison are known to match: GPTQModel 7 defaults to
        # act_group_aware (a group-preserving reordering) when desc_act is off, and to true_sequential
        kw.update(
            static_groups=a.static_groups,
            act_group_aware=False,
            true_sequential=a.true_sequential,
            damp_auto_increment=0.0015,
        )
    qcfg = QuantizeConfig(**kw)
    # fp16 like labkit's export
    model = GPTQModel.load(path, qcfg, device="cpu", dtype=torch.float16)
    t0 = time.perf_counter()
    model.quantize(
        calib,
        batch_size=a.batch_size,
        **({"backend": BACKEND.AWQ_TORCH} if method == "awq" else {}),
    )
    seconds = time.perf_counter() - t0
    model.save(a.out)
    del model
    out = {
        "quant_seconds": seconds,
        "library": f"gptqmodel {_version('gptqmodel')}",
        "method": method,
        "path": a.out,
    }
    # a standard GPTQ checkpoint: the caller evaluates it with labkit.quant.load_gptq
    if method == "gptq":
        return out
    loaded = GPTQModel.load(
        a.out, device="cpu", backend=BACKEND.AWQ_TORCH if method == "awq" else BACKEND.GPTQ_TORCH
    )
    out.update(_metrics(loaded.model.float() if hasattr(loaded, "model") else loaded, ref, tok, a))
    return out


def _llmcompressor_weights(a) -> dict:
    """The weight scheme both llm-compressor recipes use: symmetric int, per group or per channel."""
    return {
        "num_bits": a.bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if a.group_size > 0 else "channel",
        **({"group_size": a.group_size} if a.group_size > 0 else {}),
    }


def _llmcompressor_oneshot(a, recipe, method: str):
    """Run llm-compressor's `oneshot` with `recipe` on a copy of the model and our calibration windows;
    returns the metrics dict (timed, labelled) and the quantized model."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ref, tok = load_model(a.model, device="cpu")
    model = copy.deepcopy(ref)
    calib = _calib(tok, a)
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=a.seq_len,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0
    out = _metrics(model, ref, tok, a)
    out.update(
        quant_seconds=seconds, library=f"llmcompressor {_version('llmcompressor')}", method=method
    )
    return out, model, tok


def llmcompressor_gptq(a) -> dict:
    from llmcompressor.modifiers.quantization import GPTQModifier

    # llm-compressor 0.14 only has act-order with static groups ("static", an alias of "weight"), and
    # picks it by default: say it explicitly. Its sequential pipeline calibrates a whole decoder layer, then
    # quantizes all its linears (no true-sequential inside a layer).
    if a.act_order and not a.static_groups:
        raise ValueError(
            "llm-compressor 0.14 supports act-order only with static groups (--static-groups)"
        )
    if a.true_sequential:
        raise ValueError(
            "llm-compressor 0.14 calibrates each decoder layer in one pass: no --true-sequential"
        )
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": _llmcompressor_weights(a)}},
        ignore=["lm_head"],
        dampening_frac=a.damp,
        block_size=128,
        actorder="static" if a.act_order else None,
    )
    out, model, tok = _llmcompressor_oneshot(a, recipe, "gptq")
    if a.out:
        model.save_pretrained(a.out, save_compressed=True)
        tok.save_pretrained(a.out)
        out["path"] = a.out
    return out


def llmcompressor_awq(a) -> dict:
    """AWQ scale search (AWQModifier) then min-max rounding (QuantizationModifier), llm-compressor's recipe.

    llm-compressor 0.14 pins its cached activations in page-locked memory before the grid search, to
    speed up host->GPU copies; without an accelerator torch refuses (`pin_memory` needs one). Pinning
    changes no number, so on a CPU-only machine we skip it: IntermediatesCache.pin_memory becomes a no-op.
    """
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    groups = {"group_0": {"targets": ["Linear"], "weights": _llmcompressor_weights(a)}}
    recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    return _llmcompressor_oneshot(a, recipe, "awq")[0]


def torchao_int8(a) -> dict:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    from labkit.evaluate import saved_bytes
    from labkit.quant.reference import ReferenceLogits
    from labkit.timing import decode_tokens_per_second

    ref, tok = load_model(a.model, device="cpu")
    # both configs are compared with the same fp32 logits: compute them once
    ref_logits = ReferenceLogits(ref)
    out: dict[str, dict | str] = {}
    for name, config in (
        ("int8_dynamic", Int8DynamicActivationInt8WeightConfig()),
        ("int8_weight_only", Int8WeightOnlyConfig()),
    ):
        model = copy.deepcopy(ref)
        t0 = time.perf_counter()
        # only the decoder blocks' linears, like labkit's torch.ao variants (the head is tied to the embedding)
        quantize_(
            model,
            config,
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn,
        )
        seconds = time.perf_counter() - t0
        r = _metrics(model, ref_logits, tok, a)
        r.update(
            quant_seconds=seconds,
            disk_bytes=saved_bytes(model),
            decode_tok_s=decode_tokens_per_second(model, tok, new_tokens=a.decode_tokens, runs=2),
        )
        out[name] = r
    out["fp32"] = {
        "disk_bytes": saved_bytes(ref),
        "decode_tok_s": decode_tokens_per_second(ref, tok, new_tokens=a.decode_tokens, runs=2),
    }
    out["library"] = f"torchao {_version('torchao')}"
    return out


def load_export(a) -> dict:
    """Load a labkit GPTQ export with GPTQModel, and with transformers (which uses GPTQModel for GPTQ
    checkpoints), and save their logits on fixed tokens: the format check behind tests/test_quant_libs.py."""
    from gptqmodel import BACKEND, GPTQModel

    ids = (torch.arange(32)[None] * 37) % 4000 + 5
    out = {"library": f"gptqmodel {_version('gptqmodel')}"}
    model = GPTQModel.load(a.out, device="cpu", backend=BACKEND.GPTQ_TORCH)
    with torch.no_grad():
        torch.save(
            model.model(input_ids=ids).logits.float(), os.path.join(a.out, "gptqmodel_logits.pt")
        )
    out["gptqmodel_logits"] = os.path.join(a.out, "gptqmodel_logits.pt")
    try:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(a.out, device_map="cpu")
        with torch.no_grad():
            torch.save(
                hf(input_ids=ids).logits.float(), os.path.join(a.out, "transformers_logits.pt")
            )
        out["transformers_logits"] = os.path.join(a.out, "transformers_logits.pt")
    except Exception as err:  # reported, not fatal: the GPTQModel path is the one we require
        out["transformers_error"] = f"{type(err).__name__}: {err}"[:500]
    torch.save(ids, os.path.join(a.out, "probe_ids.pt"))
    return out


def logits_export(a) -> dict:
    """The logits GPTQModel computes, in float32, at every position of each sequence in `token_ids`, from
    a labkit GPTQ export as it loads and runs it (its torch kernel). Saved next to the checkpoint (one
    [len, vocab] tensor per sequence): the check behind tests/test_vllm_gptq.py's GPTQModel test."""
    from gptqmodel import BACKEND, GPTQModel

    # its torch kernel loads in 16-bit floats only; in float32 it dequantizes exactly as labkit does
    model = GPTQModel.load(a.out, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    model.model.float()
    with torch.no_grad():
        logits = [model.model(input_ids=torch.tensor([ids])).logits[0] for ids in a.token_ids]
    path = os.path.join(a.out, "gptqmodel_float32_logits.pt")
    torch.save(logits, path)
    return {"library": f"gptqmodel {_version('gptqmodel')}", "logits": path}


def _version(pkg):
    from importlib.metadata import version

    return version(pkg)


TASKS = {
    "gptqmodel-gptq": lambda a: gptqmodel_quantize(a, "gptq"),
    "gptqmodel-awq": lambda a: gptqmodel_quantize(a, "awq"),
    "llmcompressor-gptq": llmcompressor_gptq,
    "llmcompressor-awq": llmcompressor_awq,
    "torchao-int8": torchao_int8,
    "load-export": load_export,
    "logits-export": logits_export,
}


# every option a task reads, with its default; a request overrides any of them
OPTIONS: dict[str, object] = {
    "model": None,
    "out": "",
    "bits": 4,
    "group_size": 128,
    "act_order": False,
    "static_groups": False,
    "true_sequential": False,
    "damp": 0.01,
    "n_samples": 64,
    "seq_len": 256,
    "seed": 0,
    "batch_size": 8,
    "eval_tokens": 8192,  # 0 = the whole held-out split
    "decode_tokens": 32,
    "token_ids": [],  # logits-export: the token sequences to score
}


def handle(request: dict) -> dict:
    """Run one request: {"task": TASK, option: value, ...}."""
    request = dict(request)
    task = request.pop("task", None)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    unknown = set(request) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    options = {**OPTIONS, **{k: v for k, v in request.items() if v is not None}}
    torch.manual_seed(0)
    return TASKS[task](SimpleNamespace(**options))


if __name__ == "__main__":
    serve(handle)
