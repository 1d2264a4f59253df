"""Before/after a refactor: the same measurements on two commits, paired (issue 16's "behaviour stays").

    .venv/bin/python benchmarks/refactor.py --before 6b373d3 [--rounds 3]

Checks out `--before` into a temporary git worktree and runs, alternately on the two trees (each in its
own process, PYTHONPATH pointing at that tree's labkit), two measurements on the course model:
  - engine throughput on the mixed workload (64 requests, greedy, ignore_eos), tokens/s, and the greedy
    token ids (must be identical);
  - RTN 4-bit g64 and GPTQ 4-bit g64 perplexity on 1,024 held-out tokens (deterministic: must agree).
The throughput ratio after/before is the median of per-round ratios. Writes benchmarks/results/refactor.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit.results import save_record  # noqa: E402

PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
from labkit import load_model
from labkit.engine import LLMEngine
from labkit.engine.workload import mixed_workload, run_engine
model, tok = load_model(device="cpu")
what = sys.argv[1]
if what == "engine":
    workload = mixed_workload(64, seed=0)
    engine = LLMEngine(model, tok, max_num_seqs=32)
    run_engine(engine, workload[:4], tag="warm")
    r = run_engine(engine, workload, tag="run")
    from labkit.engine.sampling import SamplingParams
    check = LLMEngine(model, tok, max_num_seqs=32)
    for i, (p, k) in enumerate(workload):
        check.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
    ids = check.run_to_completion()
    print(json.dumps({"tokens_per_s": r["tokens_per_s"], "ids": [ids[str(i)] for i in range(64)]}))
else:
    import copy
    from labkit.data import calibration_batches, heldout_ids
    from labkit.evaluate import evaluate_lm
    from labkit.quant import gptq_quantize_model, rtn_quantize_model
    torch.manual_seed(0)
    ids = heldout_ids(tok, 1024)
    calib = calibration_batches(tok, n_samples=8, seq_len=128, seed=0)
    out = {}
    for name, q in (("rtn_4bit_g64", lambda m: rtn_quantize_model(m, 4, 64)),
                    ("gptq_4bit_g64", lambda m: gptq_quantize_model(m, calib, 4, 64, progress=False))):
        m = copy.deepcopy(model)
        q(m)
        out[name] = evaluate_lm(m, ids, window=256)["perplexity"]
    print(json.dumps(out))
"""


def probe(tree: Path, what: str) -> dict:
    env = {
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE, what], cwd=tree, env=env, capture_output=True, text=True
    )
    if run.returncode:
        raise RuntimeError(f"{tree} {what} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit before the refactor")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="labkit-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True
        )
        try:
            trees = {"before": before, "after": ROOT}
            rounds = []
            for r in range(args.rounds):
                pair = {name: probe(tree, "engine") for name, tree in trees.items()}
                rounds.append(pair)
                print(
                    f"round {r}: "
                    + ", ".join(f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in pair.items()),
                    flush=True,
                )
            quality = {name: probe(tree, "quant") for name, tree in trees.items()}
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False
            )
    ratios = [p["after"]["tokens_per_s"] / p["before"]["tokens_per_s"] for p in rounds]
    same_ids = all(p["after"]["ids"] == p["before"]["ids"] for p in rounds)
    ratio = statistics.median(ratios)
    same_quality = all(
        abs(quality["after"][k] - quality["before"][k]) <= 1e-3 * quality["before"][k]
        for k in quality["before"]
    )
    figures = {
        "before_commit": args.before,
        "engine_tokens_per_s": {
            k: [p[k]["tokens_per_s"] for p in rounds] for k in ("before", "after")
        },
        "engine_ratio_after_vs_before_per_round": ratios,
        "engine_ratio_after_vs_before": ratio,
        "same_greedy_tokens": same_ids,
        "perplexity": quality,
    }
    targets = {
        "engine_throughput_within_noise_or_better": ratio >= 0.9,
        "same_greedy_tokens": same_ids,
        "same_quantization_perplexity": same_quality,
    }
    print(json.dumps({**figures, "targets_met": targets}, indent=2)[:3000])
    print("wrote", save_record("refactor", figures, targets))


if __name__ == "__main__":
    main()
