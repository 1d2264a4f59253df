"""Engine benchmark on the real model: KV cache vs none, batching at equal KV memory, labkit vs vLLM.

    .venv/bin/python benchmarks/engine.py [--model smollm2] [--threads N] [--skip-vllm] [--skip-hf]

Writes results/engine.json and the committed record benchmarks/results/engine.json. Every number is
measured in this run, on this machine; the targets are ratios within the run (never absolute times), so
they mean the same on a laptop and on a GPU box:
  - decoding 256 tokens with the KV cache >= 5x faster than without;
  - continuous batching over a paged cache >= 3x the throughput of static batching over a contiguous cache
    *given the same KV-cache memory*, on ShareGPT-shaped lengths (labkit/engine/kv_budget.py says how they
    are drawn and scaled); admitted batch sizes, memory utilisation and the padded-work ceiling beside it.
    Restated by issue 25: >= 0.95 of the ratio of decode steps; judged on the whole run and, beside it, on
    the pure decode steps alone (both policies prefill the same prompts, time the step ratio cannot see);
  - labkit's engine throughput >= vLLM's on this CPU on the mixed workload, judged against vLLM as it
    runs by default (torch.compile) with labkit's decode step compiled too (compiled_decode.py, every
    batch size compiled before the timed runs); eager vLLM is paired with eager labkit beside it;
  - the same at fixed batch sizes (16 and 64 requests of equal length, both engines compiled, up to 64
    sequences at once): decode throughput where the batch, not the scheduler, decides.
Paired: the two sides of each ratio alternate run by run, and each ratio is the median of per-pair ratios.
"""

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.data import heldout_ids
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.baselines import generate_no_cache, hf_generate_sequential
from labkit.engine.checks import reference_greedy_with_cache
from labkit.engine.kv_budget import (
    build_workload,
    ceilings,
    run_continuous_paged,
    run_static_contiguous,
    sharegpt_like_lengths,
)
from labkit.engine.kv_cache import KVShape, kv_bytes_per_token
from labkit.engine.vllm_runner import PairedRunner, vllm_available
from labkit.engine.workload import mixed_workload, run_engine
from labkit.results import save_record
from labkit.serve.launch import process_cpu_seconds
from labkit.timing import time_it


def with_cores_used(cpu_seconds, run, cores: list):
    """run() -> its result, appending to `cores` how many cores the process measured by `cpu_seconds`
    kept busy meanwhile (CPU seconds / wall seconds): the check that both engines computed on as many."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = run()
    used = cpu_seconds()
    if cpu is not None and used is not None:
        cores.append((used - cpu) / (time.perf_counter() - wall))
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, plus every run's throughput (to see the spread)."""
    runs = sorted(runs, key=lambda r: r["wall_s"])
    return {
        **{k: v for k, v in runs[len(runs) // 2].items() if k != "token_ids"},
        "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
    }


def fixed_batches(args, model, tok, labkit_ids: dict[str, list[int]]) -> tuple[dict, dict]:
    """labkit and vLLM (compiled, the same threads) paired on B requests of args.fixed_tokens tokens each,
    for each B in args.fixed_batches, both engines allowed max(B) sequences: (figures, per-pair ratios).
    The prompts are the mixed workload's; labkit_ids (prompt -> the eager engine's greedy tokens) check
    vLLM's on the tokens both produced."""
    batches = [int(b) for b in args.fixed_batches.split(",")]
    prompts = [p for p, _ in mixed_workload(max(batches), seed=0)]
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=max(batches)))
    figures: dict = {
        "tokens_per_request": args.fixed_tokens,
        "labkit_compile_s": engine.warm_up(batches),
    }
    ratios: dict[str, list[float]] = {}
    with PairedRunner(
        "vllm",
        [(p, args.fixed_tokens) for p in prompts],
        args.model,
        max_num_seqs=max(batches),
        enforce_eager=False,
        torch_threads=args.threads or None,
    ) as vllm:
        figures["vllm_startup_s"] = vllm.info["startup_s"]
        for b in batches:
            workload = [(p, args.fixed_tokens) for p in prompts[:b]]
            run_engine(engine, workload[:4], tag=f"warmup{b}")
            pairs = [
                (run_engine(engine, workload, tag=f"fixed{b}-{r}"), vllm.run(workload))
                for r in range(args.repeats)
            ]
            agree = [
                ids[: len(theirs)] == theirs[: len(ids)]
                for (prompt, _), theirs in zip(workload, pairs[0][1]["token_ids"])
                if (ids := labkit_ids.get(prompt)) is not None
            ]
            figures[f"batch_{b}"] = {
                "labkit_tokens_per_s": [a["tokens_per_s"] for a, _ in pairs],
                "vllm_tokens_per_s": [v["tokens_per_s"] for _, v in pairs],
                "vllm_same_greedy_prefix_as_labkit": sum(agree) / len(agree) if agree else None,
            }
            ratios[f"labkit_vs_vllm_compiled_batch_{b}"] = [
                a["tokens_per_s"] / v["tokens_per_s"] for a, v in pairs
            ]
            print(
                f"batch {b}: labkit/vLLM {statistics.median(ratios[f'labkit_vs_vllm_compiled_batch_{b}']):.2f}x"
            )
    return figures, ratios


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), course, or a Llama-family hub id / path",
    )
    ap.add_argument(
        "--requests", type=int, default=64, help="requests of the mixed workload (vLLM)"
    )
    ap.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    ap.add_argument(
        "--long-fraction",
        type=float,
        default=0.2,
        help="share of long (192-256 token) answers in the mixed workload of the vLLM comparison",
    )
    ap.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=4096,
        help="the KV-cache memory both batching policies get, in tokens (x the model's bytes per token)",
    )
    ap.add_argument(
        "--budget-requests", type=int, default=48, help="requests of the equal-memory workload"
    )
    ap.add_argument(
        "--length-scale",
        type=float,
        default=0.25,
        help="ShareGPT's mean lengths (161 in, 338 out) times this: 0.25 keeps a CPU run to minutes",
    )
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="the max_tokens every request of the equal-memory workload sends (static batching "
        "reserves prompt + max_tokens)",
    )
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both engines on a CPU (default 0 = torch's default, every core: what "
        "vLLM's CPU engine uses when it runs in-process, as here; the record gives the cores each side used)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="paired runs: static and continuous alternate, then labkit and vLLM alternate; each ratio is "
        "the median of the per-pair ratios, so a run disturbed by another job does not decide",
    )
    ap.add_argument(
        "--vllm-mode",
        choices=("compiled", "eager", "both"),
        default="both",
        help="vLLM with torch.compile (its default; ~1 min more start-up on a CPU), eager, or both; the "
        "target is judged against compiled when it ran",
    )
    ap.add_argument(
        "--fixed-batches",
        default="16,64",
        help="batch sizes at which labkit and vLLM (both compiled) are also paired, comma-separated",
    )
    ap.add_argument(
        "--fixed-tokens", type=int, default=64, help="tokens per request at a fixed batch"
    )
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument(
        "--skip-hf", action="store_true", help="skip the slow one-request-at-a-time HF baseline"
    )
    args = ap.parse_args(argv)
    if min(args.requests, args.max_num_seqs, args.decode_tokens, args.repeats) < 1:
        ap.error("--requests, --max-num-seqs, --decode-tokens and --repeats must be >= 1")
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    device = next(model.parameters()).device
    out = {
        "model": args.model or "course",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "requests": args.requests,
        "max_num_seqs": args.max_num_seqs,
    }
    print(f"model {out['model']} on {device}, {out['threads']} torch threads")

    # 1. KV cache vs none: same greedy tokens, timed end to end
    prompt = tok("It is a truth universally acknowledged")["input_ids"]
    n = min(args.decode_tokens, model.config.max_position_embeddings - len(prompt))
    assert generate_no_cache(model, prompt, 16) == reference_greedy_with_cache(model, prompt, 16)
    no_cache = time_it(lambda: generate_no_cache(model, prompt, n), warmup=0, runs=1).median
    cached = time_it(lambda: reference_greedy_with_cache(model, prompt, n), warmup=1, runs=3).median
    out["kv_cache"] = {
        "tokens": n,
        "no_cache_s": no_cache,
        "cache_s": cached,
        "speedup": no_cache / cached,
    }
    print(
        f"decode {n} tokens: no cache {no_cache:.2f} s, cache {cached:.2f} s -> {no_cache / cached:.1f}x"
    )

    # 2. batching at equal KV memory: static + contiguous vs continuous + paged, paired runs
    context = model.config.max_position_embeddings
    lengths = sharegpt_like_lengths(
        args.budget_requests, args.length_scale, args.max_tokens, context, seed=0
    )
    budget_workload = build_workload(heldout_ids(tok, None), lengths)
    budget = args.kv_budget_tokens
    out["equal_memory"] = {
        "kv_budget_tokens": budget,
        "kv_budget_bytes": budget
        * kv_bytes_per_token(KVShape.of(model), next(model.parameters()).dtype),
        "requests": args.budget_requests,
        "length_scale": args.length_scale,
        "max_tokens": args.max_tokens,
        "mean_input": statistics.mean(i for i, _ in lengths),
        "mean_output": statistics.mean(o for _, o in lengths),
        **ceilings(budget_workload, args.max_tokens, budget),
    }
    static_runs, paged_runs = [], []
    for r in range(args.repeats):
        static_runs.append(
            run_static_contiguous(model, tok, budget_workload, args.max_tokens, budget)
        )
        paged_runs.append(run_continuous_paged(model, tok, budget_workload, budget))
        print(
            f"equal memory, pair {r}: static {static_runs[-1].summary()['tokens_per_s']:.1f} tok/s, "
            f"paged {paged_runs[-1].summary()['tokens_per_s']:.1f} tok/s; pure decode steps "
            f"{static_runs[-1].decode_s:.1f} vs {paged_runs[-1].decode_s:.1f} s, prompt steps "
            f"{static_runs[-1].prefill_s:.1f} vs {paged_runs[-1].prefill_s:.1f} s",
            flush=True,
        )
    pair_ratios = {
        "continuous_paged_vs_static_contiguous": [
            p.summary()["tokens_per_s"] / s_.summary()["tokens_per_s"]
            for s_, p in zip(static_runs, paged_runs)
        ],
        # the same useful tokens: the ratio of the seconds in pure decode steps is their throughput ratio
        "continuous_paged_vs_static_contiguous_decode_phase": [
            s_.decode_s / p.decode_s for s_, p in zip(static_runs, paged_runs)
        ],
        # the whole run's ceiling if each of continuous's pure decode steps cost what static's did on
        # average, both prefilling the same prompts in the time measured
        "equal_step_cost_ceiling": [
            (s_.prefill_s + s_.decode_s)
            / (p.prefill_s + p.pure_decode_steps * s_.decode_s / s_.pure_decode_steps)
            for s_, p in zip(static_runs, paged_runs)
        ],
    }
    eq = out["equal_memory"]
    eq["static_contiguous"] = static_runs[-1].summary()
    eq["continuous_paged"] = paged_runs[-1].summary()
    eq["same_greedy_tokens"] = static_runs[0].token_ids == paged_runs[0].token_ids
    # if every decode step cost the same (memory-bound decode), throughput would scale with steps saved
    eq["decode_step_ratio"] = static_runs[-1].decode_steps / paged_runs[-1].decode_steps
    # the same without the steps that fed prompts: both policies prefill the same prompts
    eq["pure_decode_step_ratio"] = (
        static_runs[-1].pure_decode_steps / paged_runs[-1].pure_decode_steps
    )

    # 3. the mixed workload: HF one at a time, labkit's engine, vLLM
    workload = mixed_workload(args.requests, seed=0, long_fraction=args.long_fraction)
    prompts, mixed_lengths = [p for p, _ in workload], [k for _, k in workload]
    tokens = sum(mixed_lengths)
    out["workload"] = {
        "seed": 0,
        "long_fraction": args.long_fraction,
        "output_tokens": tokens,
        "output_lengths": mixed_lengths,
    }
    # labkit compiled (its default; every batch size compiled before the timed runs, as vLLM does at
    # start-up) and eager; each is paired with vLLM in the same mode
    engines = {
        mode: LLMEngine(
            model, tok, EngineConfig(max_num_seqs=args.max_num_seqs, enforce_eager=mode == "eager")
        )
        for mode in ("compiled", "eager")
    }
    out["labkit_compile_s"] = engines["compiled"].warm_up()
    engine = engines["compiled"]
    for e in engines.values():
        run_engine(e, workload[:4], tag="warmup")
    systems = {}
    if not args.skip_hf:
        t = time.perf_counter()
        hf_generate_sequential(model, tok, prompts, mixed_lengths)
        wall = time.perf_counter() - t
        systems["hf_generate_sequential"] = {"wall_s": wall, "tokens_per_s": tokens / wall}
    systems["labkit_continuous"] = median_run(
        [run_engine(engine, workload, tag=f"cont{r}") for r in range(args.repeats)]
    )
    check = LLMEngine(model, tok, EngineConfig(max_num_seqs=args.max_num_seqs, enforce_eager=True))
    for i, (p, k) in enumerate(workload):
        check.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
    labkit_ids = check.run_to_completion()
    labkit_ids = [labkit_ids[str(i)] for i in range(len(workload))]

    ok, why = vllm_available()
    if args.skip_vllm or not ok:
        out["vllm_skipped"] = "--skip-vllm" if args.skip_vllm else why
        print("vLLM skipped:", out["vllm_skipped"])
    else:
        # vLLM stays up in its own process; its runs alternate with labkit's (paired measurements). "compiled" is
        # vLLM's default (torch.compile of the model at start-up); "eager" skips that, like labkit.
        try:
            for mode in ["compiled", "eager"] if args.vllm_mode == "both" else [args.vllm_mode]:
                with PairedRunner(
                    "vllm",
                    workload,
                    args.model,
                    max_num_seqs=args.max_num_seqs,
                    enforce_eager=mode == "eager",
                    torch_threads=args.threads or None,  # the same threads as labkit's
                ) as vllm:
                    pairs, cores = [], {"labkit": [], "vllm": []}
                    for r in range(args.repeats):
                        pairs.append(
                            (
                                with_cores_used(
                                    time.process_time,
                                    partial(
                                        run_engine, engines[mode], workload, tag=f"pair-{mode}{r}"
                                    ),
                                    cores["labkit"],
                                ),
                                with_cores_used(
                                    lambda: process_cpu_seconds(vllm.worker.proc.pid),
                                    vllm.run,
                                    cores["vllm"],
                                ),
                            )
                        )
                ids = pairs[0][1]["token_ids"]
                v = {**median_run([b for _, b in pairs]), **vllm.info}
                v["same_tokens_as_labkit"] = sum(a == b for a, b in zip(ids, labkit_ids)) / len(
                    workload
                )
                v["cores_used"] = cores["vllm"]  # CPU seconds / wall seconds, run by run
                systems[f"vllm_{mode}"] = v
                systems[f"labkit_continuous_paired_with_{mode}"] = {
                    **median_run([a for a, _ in pairs]),
                    "cores_used": cores["labkit"],
                }
                pair_ratios[f"labkit_vs_vllm_{mode}"] = [
                    a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs
                ]
            if args.vllm_mode != "eager" and args.fixed_batches:
                out["fixed_batches"], fixed_ratios = fixed_batches(
                    args, model, tok, dict(zip(prompts, labkit_ids))
                )
                pair_ratios.update(fixed_ratios)
        except Exception as err:  # report, do not hide: the record says why vLLM is missing
            out["vllm_skipped"] = f"vLLM run failed: {err}"[:2000]
            print(out["vllm_skipped"])
    out["systems"] = systems
    for name, s in systems.items():
        lat = (
            ""
            if "latency_mean_s" not in s
            else f"  latency mean {s['latency_mean_s']:.2f} s p90 {s['latency_p90_s']:.2f} s"
        )
        print(f"{name:42s} {s['tokens_per_s']:8.0f} tokens/s  ({s['wall_s']:.2f} s){lat}")

    # each target ratio = the median of per-pair ratios (runs that met the same machine load)
    ratios = {
        "kv_cache_speedup": out["kv_cache"]["speedup"],
        "continuous_paged_vs_static_contiguous": statistics.median(
            pair_ratios["continuous_paged_vs_static_contiguous"]
        ),
        "static_padded_work": eq["static_padded_work"],
        "decode_step_ratio": eq["decode_step_ratio"],
        "pure_decode_step_ratio": eq["pure_decode_step_ratio"],
        "continuous_paged_vs_static_contiguous_decode_phase": statistics.median(
            pair_ratios["continuous_paged_vs_static_contiguous_decode_phase"]
        ),
        "equal_step_cost_ceiling": statistics.median(pair_ratios["equal_step_cost_ceiling"]),
    }
    targets = {
        "kv_cache_speedup_ge_5x": ratios["kv_cache_speedup"] >= 5,
        # restated (issue 25): 3x lies above this workload's ceiling, its decode-step ratio (static's decode
        # steps over continuous's); continuous + paged should reach 0.95 of it
        "continuous_paged_vs_static_contiguous_ge_0.95_of_decode_step_ratio": ratios[
            "continuous_paged_vs_static_contiguous"
        ]
        >= 0.95 * ratios["decode_step_ratio"],
        # what the step ratio predicts, measured where it applies: the steps that fed no prompt token (the
        # prompts are the same work under both policies, and the whole run's ratio includes them)
        "continuous_paged_decode_phase_ge_0.95_of_pure_decode_step_ratio": ratios[
            "continuous_paged_vs_static_contiguous_decode_phase"
        ]
        >= 0.95 * ratios["pure_decode_step_ratio"],
    }
    for mode in ("compiled", "eager"):
        if f"labkit_vs_vllm_{mode}" in pair_ratios:
            ratios[f"labkit_vs_vllm_{mode}"] = statistics.median(
                pair_ratios[f"labkit_vs_vllm_{mode}"]
            )
    # vLLM's default decides
    main_mode = "compiled" if "labkit_vs_vllm_compiled" in ratios else "eager"
    if f"labkit_vs_vllm_{main_mode}" in ratios:
        targets[f"labkit_ge_vllm_{main_mode}"] = ratios[f"labkit_vs_vllm_{main_mode}"] >= 1
    for name, runs in pair_ratios.items():
        if name.startswith("labkit_vs_vllm_compiled_batch_"):
            ratios[name] = statistics.median(runs)
            targets[name.replace("labkit_vs_vllm", "labkit_ge_vllm")] = ratios[name] >= 1
    out["pair_ratios"] = pair_ratios
    cont = systems["labkit_continuous"]["tokens_per_s"]
    if "hf_generate_sequential" in systems:
        ratios["continuous_vs_hf_sequential"] = (
            cont / systems["hf_generate_sequential"]["tokens_per_s"]
        )
    out["ratios"], out["targets_met"] = ratios, targets
    for k, v in ratios.items():
        print(f"{k:30s} {v:6.2f}x")
    print("targets:", targets)
    print("wrote", save_record("engine", out, targets))


if __name__ == "__main__":
    main()
