"""Speculative decoding benchmark: prompt-lookup drafts vs plain decoding, batch 1, on SmolLM2-Instruct.

    .venv/bin/python benchmarks/speculative.py [--model smollm2] [--prompts 6] [--max-tokens 128]
        [--pairs 3] [--k 4] [--ngram 3] [--threads N] [--skip-vllm]

The workload is input-grounded (labkit.engine.workload.grounded_workload): the chat model is asked to
repeat, quote or summarise a held-out Pride and Prejudice paragraph, one request at a time (batch 1, where
decode is most memory-bound and speculation pays most). Greedy, stopping at the end-of-turn token.
Paired: plain and speculative runs alternate (AB, BA, ...), each pair meeting the same machine load; the
speed-up is the median of per-pair ratios. Every number is measured in this run. Target:
  - speculative decoding (n-gram, k drafted tokens) >= 1.5x plain decoding's tokens/s, with the same
    tokens (greedy equivalence, checked) and the acceptance rate reported.
vLLM's own n-gram speculative decoding on the same workload is reported beside it where it runs.
Writes results/speculative.json and the committed record benchmarks/results/speculative.json.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.engine import LLMEngine, SamplingParams
from labkit.engine.speculative import SpeculativeStats
from labkit.engine.workload import grounded_workload
from labkit.results import save_record
from labkit.workers.bench_client import PairedRunner
from labkit.workers.venvs import vllm_available


def decode_batch1(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Each prompt alone, one after another: output tokens per second over the whole run, and the tokens."""
    outputs, tokens, began = [], 0, time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        out = engine.run_to_completion()[f"q{i}"]
        outputs.append(out)
        tokens += len(out)
    wall = time.perf_counter() - began
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "outputs": outputs}


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=6, help="grounded prompts per run")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=3, help="plain/speculative run pairs")
    ap.add_argument("--k", type=int, default=4, help="tokens drafted per step at most")
    ap.add_argument("--ngram", type=int, default=3, help="longest n-gram looked up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    prompts = grounded_workload(tok, n=args.prompts)
    engines = {
        "plain": LLMEngine(model, tok, max_num_seqs=1),
        "speculative": LLMEngine(
            model,
            tok,
            max_num_seqs=1,
            speculative_ngram=args.ngram,
            num_speculative_tokens=args.k,
        ),
    }
    decode_batch1(
        engines["speculative"], prompts[:1], 8
    )  # warm-up: the first forward passes are slow
    engines["speculative"].speculator.stats = SpeculativeStats()  # count the measured runs only
    runs: dict[str, list[dict]] = {"plain": [], "speculative": []}
    for pair in range(args.pairs):
        order = ["plain", "speculative"] if pair % 2 == 0 else ["speculative", "plain"]
        for name in order:
            runs[name].append(decode_batch1(engines[name], prompts, args.max_tokens))
            print(f"pair {pair} {name:12s} {runs[name][-1]['tokens_per_s']:7.2f} tok/s", flush=True)
    identical = all(
        r["outputs"] == runs["plain"][0]["outputs"] for r in runs["plain"] + runs["speculative"]
    )
    ratios = [
        s["tokens_per_s"] / p["tokens_per_s"] for p, s in zip(runs["plain"], runs["speculative"])
    ]
    stats = engines["speculative"].stats()
    if not stats.num_draft_tokens:
        sys.exit(
            "no drafted token was counted in the measured runs: the acceptance rate would read 0"
        )
    figures = {
        "model": args.model,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "num_speculative_tokens": args.k,
        "speculative_ngram": args.ngram,
        "pairs": args.pairs,
        "output_tokens_per_run": runs["plain"][0]["tokens"],
        "plain_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs["plain"]),
        "speculative_tokens_per_s": statistics.median(
            r["tokens_per_s"] for r in runs["speculative"]
        ),
        "speedup": statistics.median(ratios),
        "speedup_per_pair": ratios,
        "draft_acceptance_rate": stats.draft_acceptance_rate,
        "mean_tokens_per_verify_step": stats.mean_tokens_per_verify_step,
        "identical_output": identical,
    }
    figures["vllm"] = (
        vllm_ngram(args, tok, prompts) if not args.skip_vllm else {"skipped": "--skip-vllm"}
    )
    print(
        f"plain {figures['plain_tokens_per_s']:.2f} tok/s, speculative "
        f"{figures['speculative_tokens_per_s']:.2f} tok/s: {figures['speedup']:.2f}x "
        f"(acceptance {stats.draft_acceptance_rate:.0%}, {stats.mean_tokens_per_verify_step:.2f} "
        f"tokens per verifying step); identical output: {identical}"
    )
    print("vllm:", figures["vllm"])
    targets = {"ngram_speedup_ge_1.5x": bool(figures["speedup"] >= 1.5 and identical)}
    print("targets met:", targets)
    print("wrote", save_record("speculative", figures, targets))


def vllm_ngram(args, tok, prompts: list[list[int]]) -> dict:
    """vLLM's own n-gram speculative decoding on the same prompts at batch 1, paired against plain vLLM
    (each in a worker process of its own, runs alternated), or why it was skipped. vLLM's bench worker
    generates exactly max_tokens per prompt (ignore_eos), so its token counts differ from labkit's runs
    above: compare the two speed-ups, not the speeds."""
    ok, why = vllm_available()
    if not ok:
        return {"skipped": why}
    workload = [(tok.decode(p), args.max_tokens) for p in prompts]
    ngram = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_max": args.ngram,
        "prompt_lookup_min": 1,
    }
    try:
        with (
            # the same torch threads as labkit's (None: the worker's default)
            PairedRunner(
                "vllm", workload, args.model, max_num_seqs=1, torch_threads=args.threads
            ) as plain,
            PairedRunner(
                "vllm",
                workload,
                args.model,
                max_num_seqs=1,
                speculative_config=ngram,
                torch_threads=args.threads,
            ) as spec,
        ):
            pairs = []
            for _ in range(args.pairs):
                a, b = plain.run(), spec.run()
                pairs.append((a["tokens_per_s"], b["tokens_per_s"]))
                print(f"vLLM plain {a['tokens_per_s']:.2f} / n-gram {b['tokens_per_s']:.2f} tok/s")
            version = plain.info.get("version")
    except RuntimeError as err:  # e.g. this build refuses the speculative config: say so
        return {"skipped": f"vLLM failed: {str(err)[-600:]}"}
    ratios = [s / p for p, s in pairs]
    return {
        "version": version,
        "speculative_config": ngram,
        "plain_tokens_per_s": statistics.median(p for p, _ in pairs),
        "ngram_tokens_per_s": statistics.median(s for _, s in pairs),
        "speedup": statistics.median(ratios),
        "speedup_per_pair": ratios,
    }


if __name__ == "__main__":
    main()
