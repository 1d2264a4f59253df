"""labkit's GPTQ export loads in the production library (GPTQModel, and transformers through it) with the
same logits labkit computes. Needs .venv-quant (`make quant-libs`, part of `make test`); skips without it."""

import copy

import pytest
import torch

from labkit import load_model
from labkit.data import calibration_batches
from labkit.quant import export_gptq, gptq_quantize_model, load_gptq
from labkit.quant.libs import libraries_available, run_library

pytestmark = pytest.mark.skipif(
    not libraries_available(), reason=".venv-quant missing: run `make quant-libs`"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tok = load_model(device="cpu")
    model = copy.deepcopy(model)
    calib = calibration_batches(tok, 4, 128)
    results = gptq_quantize_model(model, calib, 4, 128, act_order=True, progress=False)
    out = export_gptq(model, results, tmp_path_factory.mktemp("gptq") / "course-gptq-4bit", tok)
    return out


def test_gptqmodel_loads_labkit_export_with_same_logits(exported):
    info = run_library("load-export", out=exported, timeout=900)
    ids = torch.load(exported / "probe_ids.pt")
    ours, _ = load_gptq(exported, device="cpu")
    with torch.no_grad():
        want = ours(input_ids=ids).logits.float()
    got = torch.load(info["gptqmodel_logits"])
    # GPTQModel computes in float16/bfloat16 on CPU: compare loosely, and the predictions exactly
    assert torch.allclose(got, want, atol=0.15, rtol=0.05), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    if "transformers_logits" in info:
        hf = torch.load(info["transformers_logits"])
        assert (hf.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    else:
        print("transformers could not load it:", info.get("transformers_error"))
