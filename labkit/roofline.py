"""Bytes per token: predict decode speed from memory bandwidth, and check the prediction.

A decode step multiplies every weight matrix by a handful of vectors (one per sequence in the batch): two
FLOPs per weight per sequence, but every weight byte read from memory once per step. A CPU does tens of
GFLOP/s and reads ~20 GB/s, so at batch 1 the matmul waits for memory: the step takes

    time = max(bytes read / bandwidth,  FLOPs / FLOP rate)          (the roofline)

and bytes read = the weights (once per step, whatever the batch) + each sequence's KV cache. Hence:
- weight-only quantization cuts the bytes, so memory-bound decode speeds up by nearly the same factor;
- batching shares one weight read among B sequences: tokens per step grow B-fold for the same bytes, until
  B * FLOPs per token reach the FLOP rate, where decode turns compute-bound;
- prefill already multiplies each weight by hundreds of tokens: it is compute-bound, and neither trick helps.

One more limit shows up at batch 1 with low-bit weights: the kernel must unpack and scale every weight
before it multiplies, and on a few CPU cores that work, not memory, can set the pace. So the matmuls of a
batch-1 step take at least  max(weight bytes / bandwidth, weights / the kernel's one-row rate),  the rate
measured with the weight in cache (`measure_one_row_rate`).

Everything here counts bytes and FLOPs from the model in memory and measures the machine in the run.
"""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine.fast_layers import prepacked_linear
from .quant.qlinear import QuantLinear


def measure_read_bandwidth(mib: int = 512, runs: int = 5) -> float:
    """DRAM read bandwidth in bytes/s: the best of `runs` sums over a buffer far bigger than any cache.
    The buffer is filled with random numbers first: an untouched torch.empty reads the kernel's shared
    zero page, which sits in cache and reports several times the real bandwidth."""
    x = torch.randn(mib * 2**20 // 4)
    x.sum()  # warm up the threads
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def measure_flop_rate(linear, in_features: int, rows: int = 128, runs: int = 5) -> float:
    """FLOP/s of `linear` (x [rows, in] -> [rows, out]) on a batch of rows: the compute roof of that
    kind of matmul. Use a layer small enough to stay in cache, so memory does not limit it."""
    x = torch.randn(rows, in_features)
    out_features = linear(x).shape[-1]
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * in_features * out_features / best


def measure_one_row_rate(linear, in_features: int, runs: int = 100) -> float:
    """Weights per second `linear` gets through for one row (a batch-1 decode step) with its weight in
    cache, so that memory does not limit it: the kernel's own pace. A float matmul does one multiply-add
    per weight and stays above the memory roof; a 4-bit kernel also unpacks and scales every weight."""
    return measure_flop_rate(linear, in_features, rows=1, runs=runs) / 2


# every kernel a linear layer runs: F.linear's MKL call, oneDNN's pre-packed one (labkit's own call of it,
# engine/onednn_linear.py, or PyTorch's), PyTorch's int4/int8 kernels
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "labkit_onednn::linear",
    "mkldnn::_linear_pointwise",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int4pack_mm",
    "aten::_weight_int8pack_mm",
}


def time_in_matmuls(run, calls: int = 8) -> dict:
    """Split the time of `run()` (one decode step, say) into its weight matmuls and everything else: norms,
    rotary, attention, dtype conversions, sampling, Python. Quantization only shrinks the first part
    (Amdahl's law). The total is timed plainly; the matmuls' share comes from torch.profiler (each
    kernel's own CPU time), which would slow the many small ops if it timed them too."""
    start = time.perf_counter()
    for _ in range(calls):
        run()
    step_s = (time.perf_counter() - start) / calls
    # torch 2.13's profiler (kineto) prints a "USDT ... profiler_start/stop" pair at level 5 on every run;
    # 6 keeps a notebook's output to what it computes (set your own KINETO_LOG_LEVEL to see them)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    matmul_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    matmul_s = min(matmul_us / 1e6 / calls, step_s)
    return {"step_s": step_s, "matmul_s": matmul_s, "other_s": step_s - matmul_s}


def compiled_matmuls_seconds(runner, runs: int = 5) -> float:
    """Seconds for one row through every weight matmul of an engine's model runner, alone in one compiled
    graph, as its compiled batch-1 step runs them: the fused projections of every layer and the output
    head, float weights and 8-bit codes streamed by Inductor's reductions (matvec.py), 4-bit codes through
    their kernel. The profiler cannot time those reductions inside the step (`time_in_matmuls`): Inductor
    generates them, so they are no separate operations. Best of `runs`; one sweep reads every weight once,
    as a step does."""
    linears = [pair for layer in runner.layers for pair in layer.linears]
    linears.append((runner.lm_head, runner.model.lm_head.in_features))
    dtype = next(runner.model.parameters()).dtype
    inputs = [torch.randn(1, width, dtype=dtype, device=runner.device) for _, width in linears]

    def sweep(xs):
        return [lin(x) for (lin, _), x in zip(linears, xs)]

    compiled = torch.compile(sweep, fullgraph=True, dynamic=False)
    best = float("inf")
    with torch.inference_mode():
        compiled(inputs)  # compile
        for _ in range(runs):
            start = time.perf_counter()
            compiled(inputs)
            best = min(best, time.perf_counter() - start)
    return best


def linear_layers(model) -> list[nn.Module]:
    """Every matmul weight a decode step reads: the decoder's projections and the output head."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))]


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: each linear's weight as its forward reads it (the packed
    kernel copy for a QuantLinear), plus one embedding row per sequence (negligible, left out)."""
    total = 0
    for m in linear_layers(model):
        if isinstance(m, QuantLinear):
            total += m.bytes_read()
        else:
            total += m.weight.numel() * m.weight.element_size()
    return total


def weights_per_step(model) -> int:
    """How many weights (not bytes) one decode step multiplies: every linear layer's in x out."""
    return sum(m.in_features * m.out_features for m in linear_layers(model))


def flops_per_token(model, context: int = 0) -> int:
    """2 FLOPs per weight (multiply + add) plus attention over `context` past tokens (q.k and p.v)."""
    cfg = model.config
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * _head_dim(cfg) * context
    return 2 * weights_per_step(model) + attention


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V one cached token holds, over all layers (read once per decode step)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * _head_dim(config) * itemsize


def decode_bound(
    weight_bytes: int,
    kv_bytes_per_seq: int,
    flops_per_seq: int,
    batch: int,
    bandwidth: float,
    flop_rate: float,
) -> dict:
    """The roofline's decode tok/s for a batch: one step reads the weights once and every sequence's KV
    cache, and does every sequence's FLOPs; whichever takes longer sets the step time."""
    memory_s = (weight_bytes + batch * kv_bytes_per_seq) / bandwidth
    compute_s = batch * flops_per_seq / flop_rate
    step_s = max(memory_s, compute_s)
    return {
        "tok_s": batch / step_s,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
    }


def batch1_matmul_roof(model, bandwidth: float, one_row_rate: float) -> dict:
    """The least time a batch-1 step's matmuls can take: reading the weight bytes at `bandwidth`, or the
    kernel getting through the weights at its one-row pace (`measure_one_row_rate`), whichever is slower."""
    memory_s = weight_bytes_per_step(model) / bandwidth
    kernel_s = weights_per_step(model) / one_row_rate
    return {
        "memory_s": memory_s,
        "kernel_s": kernel_s,
        "roof_s": max(memory_s, kernel_s),
        "limit": "memory" if memory_s >= kernel_s else "kernel",
    }


def sample_layers(in_features: int = 576, out_features: int = 1536) -> dict:
    """One random layer per precision, as the engine runs it, for `measure_flop_rate` and
    `measure_one_row_rate`: float weights pre-packed for oneDNN where the CPU supports it (the engine's
    path from two rows up), else `F.linear`; int8 and int4 through QuantLinear's kernels."""
    from .quant.primitives import quantize_weight
    from .quant.scheme import QuantScheme

    int8 = QuantScheme(8, granularity="channel", symmetric=False)
    int4 = QuantScheme(4, 64, symmetric=False)

    w = torch.randn(out_features, in_features) * 0.02
    w16 = w.to(torch.bfloat16)
    fp32 = prepacked_linear(w) or (lambda x: F.linear(x, w))
    bf16 = prepacked_linear(w16) or (lambda x: F.linear(x, w16))
    return {
        "fp32": fp32,
        "bf16": lambda x: bf16(x.to(torch.bfloat16)),
        "int8": QuantLinear.from_quantized(quantize_weight(w, int8)),
        "int4": QuantLinear.from_quantized(quantize_weight(w, int4)),
    }


# Greedy equivalence, checked honestly. Two computations of the same logits (fast low-bit kernels vs their
# dequantized reference; one-row decode steps vs a multi-row prefill pass) sum in different orders, so
# their logits differ by a little and a near-tie between the top two tokens can flip. "The same tokens" is
# then checked as: identical, or each first difference a near-tie within the two paths' measured error.


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def last_logits(model):
    """ids (1, t) -> the logits at the last position from one forward pass over all t tokens (every row
    through the multi-row kernels prefill and speculative verification use)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids.to(_device_of(model))).logits[0, -1].float()

    return run


def last_logits_decoded(model):
    """ids (1, t) -> the logits at the last position from a one-token decode step after a cached pass over
    the first t - 1 tokens: the one-row kernels plain decoding uses for each new token."""

    from .quality import (
        _cache_kwarg,
    )  # forward's cache argument, by the name this transformers uses

    def run(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(_device_of(model))
        with torch.no_grad():
            cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
            out = model(input_ids=ids[:, -1:], use_cache=True, **_cache_kwarg(model, cache))
        return out.logits[0, -1].float()

    return run


def first_difference(reference, fast, prompt, ref_tokens, fast_tokens) -> dict | None:
    """Where two greedy decodings of `prompt` first differ, and why; None if they never do.

    `reference` and `fast` map ids (1, t) to the last position's logits (`last_logits(model)`,
    `last_logits_decoded(model)`). At the first differing token: the reference's logit margin between
    its token and the other, beside the largest logit difference between the two paths on that same
    prefix. A margin within that difference (in size: a reference computed by another implementation of
    its path can put the margin a hair below zero) is a near-tie the paths' rounding can flip."""
    for step, (a, b) in enumerate(zip(ref_tokens, fast_tokens)):
        if a != b:
            ids = torch.tensor([list(prompt) + list(ref_tokens[:step])])
            logits, fast_logits = reference(ids), fast(ids)
            margin = float(logits[a] - logits[b])
            error = float((fast_logits - logits).abs().max())
            return {
                "step": step,
                "reference_token": a,
                "fast_token": b,
                "reference_logit_margin": margin,
                "reference_logit_spread": float(logits.max() - logits.min()),
                "fast_logit_error_max": error,
                "near_tie_within_rounding": abs(margin) <= error,
            }
    return None
