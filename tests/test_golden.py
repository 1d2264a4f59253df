"""Golden quality numbers: each quantization recipe's perplexity and KL on a fixed slice, pinned.

Everything here is deterministic (fixed tokens, fixed calibration windows, seeded), so these numbers
only move when the code or a library under it changes what a recipe computes: a torch or transformers
upgrade, a new tokenizer, an edit to labkit.quant. The bands allow the last-bit differences between
CPUs and BLAS builds, not a change of method. When one fails on purpose, re-measure and paste:

    .venv/bin/python tests/test_golden.py      # prints GOLDEN_COURSE and GOLDEN_SMOLLM2 as measured here
"""

import copy
import math

import pytest
import torch

from labkit.data import calibration_batches, heldout_ids
from labkit.evaluate import evaluate_lm
from labkit.paths import SMOLLM2_DIR
from labkit.quant import awq_quantize_model, gptq_quantize_model, rtn_quantize_model

PPL_REL = 0.02  # perplexity: within 2% of the pinned value
KL_REL, KL_ABS = 0.10, 2e-4  # KL: within 10% (or 2e-4, for the tiny KLs of 8-bit)

# {recipe: {"perplexity": ..., "kl": ...}} as printed by this file run as a script, on 1,024 (course) /
# 512 (SmolLM2) held-out tokens. Measured 2026-12-02, torch 2.13.0+cpu, transformers 5 (AMD EPYC, AVX2).
GOLDEN_COURSE: dict = {
    "reference": {"perplexity": 56.1536},
    "rtn-int8-channel": {"perplexity": 56.1312, "kl": 4.921e-05},
    "rtn-4bit-g64": {"perplexity": 56.4238, "kl": 0.008614},
    "rtn-4bit-channel": {"perplexity": 56.4007, "kl": 0.012912},
    "gptq-4bit-g64": {"perplexity": 56.1334, "kl": 0.006576},
    "awq-4bit-g64": {"perplexity": 56.1851, "kl": 0.007757},
}
GOLDEN_SMOLLM2: dict = {
    "reference": {"perplexity": 53.2665},
    "rtn-int8-channel": {"perplexity": 52.96, "kl": 0.0031551},
    "rtn-4bit-g64": {"perplexity": 69.5816, "kl": 0.38684},
    "rtn-4bit-channel": {"perplexity": 116.964, "kl": 1.01126},
}


def recipes(model, calib):
    """(name, quantize in place) for every recipe the golden numbers cover."""
    return [
        ("rtn-int8-channel", lambda m: rtn_quantize_model(m, 8, -1)),
        ("rtn-4bit-g64", lambda m: rtn_quantize_model(m, 4, 64)),
        ("rtn-4bit-channel", lambda m: rtn_quantize_model(m, 4, -1)),
        ("gptq-4bit-g64", lambda m: gptq_quantize_model(m, calib, 4, 64, progress=False)),
        ("awq-4bit-g64", lambda m: awq_quantize_model(m, calib, 4, 64, progress=False)),
    ]


def measure(model, tokenizer, eval_tokens: int, calibrated: bool = True) -> dict:
    """{recipe: {'perplexity', 'kl'}} on the first eval_tokens held-out tokens."""
    torch.manual_seed(0)
    ids = heldout_ids(tokenizer, eval_tokens)
    calib = calibration_batches(tokenizer, n_samples=8, seq_len=128, seed=0)
    out = {"reference": {"perplexity": evaluate_lm(model, ids, window=256)["perplexity"]}}
    for name, quantize in recipes(model, calib):
        if not calibrated and not name.startswith("rtn"):
            continue
        m = copy.deepcopy(model)
        quantize(m)
        r = evaluate_lm(m, ids, window=256, reference=model)
        out[name] = {"perplexity": r["perplexity"], "kl": r["kl"]}
    return out


NOT_PINNED = "not pinned yet: run `.venv/bin/python tests/test_golden.py` on a quiet machine, paste"


def check(measured: dict, golden: dict, model: str) -> None:
    problems = []
    for recipe, want in golden.items():
        got = measured[recipe]
        if not math.isclose(got["perplexity"], want["perplexity"], rel_tol=PPL_REL):
            problems.append(
                f"{recipe}: perplexity {got['perplexity']:.4f}, pinned {want['perplexity']:.4f} "
                f"(± {PPL_REL:.0%})"
            )
        if "kl" in want and not math.isclose(got["kl"], want["kl"], rel_tol=KL_REL, abs_tol=KL_ABS):
            problems.append(
                f"{recipe}: KL {got['kl']:.6f}, pinned {want['kl']:.6f} (± {KL_REL:.0%} or {KL_ABS})"
            )
    assert not problems, (
        f"golden quality numbers of the {model} model moved:\n  "
        + "\n  ".join(problems)
        + "\nA library upgrade (torch, transformers, tokenizers) or a change to labkit.quant / "
        "labkit.evaluate changed what a recipe computes. If that is intended, re-measure with "
        "`.venv/bin/python tests/test_golden.py` and update the pinned values in this file."
    )


@pytest.mark.skipif(not GOLDEN_COURSE, reason=NOT_PINNED)
def test_golden_numbers_of_the_course_model(course):
    model, tokenizer = course
    check(measure(model, tokenizer, 1024), GOLDEN_COURSE, "course")


@pytest.mark.skipif(
    not (SMOLLM2_DIR / "config.json").exists(), reason=f"SmolLM2 not provisioned in {SMOLLM2_DIR}"
)
@pytest.mark.skipif(not GOLDEN_SMOLLM2, reason=NOT_PINNED)
def test_golden_numbers_of_smollm2(smollm2):
    model, tokenizer = smollm2
    check(measure(model, tokenizer, 512, calibrated=False), GOLDEN_SMOLLM2, "SmolLM2")


if __name__ == "__main__":
    import labkit

    for name, tokens, calibrated in (("course", 1024, True), ("smollm2", 512, False)):
        model, tokenizer = labkit.load_model(name, device="cpu")
        print(f"GOLDEN_{name.upper()} =", measure(model, tokenizer, tokens, calibrated), flush=True)
