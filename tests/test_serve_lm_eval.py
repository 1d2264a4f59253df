"""lm-evaluation-harness against `labkit serve`: the tool practitioners score (quantized) models with.

A multiple-choice task of the course's own (tests/data/austen_mc.jsonl: held-out Austen sentences,
which of four continuations comes next; local JSON, as the hub is unreachable) is run twice, with
lm-eval's `local-completions` client against the server (it asks for echo + logprobs: the prompt's
log-probabilities) and with lm-eval's own Hugging Face backend on the same model. Every choice's
loglikelihood must agree within 1e-3. lm-eval lives in .venv-eval (mk/eval.mk); without it, this skips.
"""

import json
import os
import subprocess

import pytest

from labkit.model import resolve_model_name
from labkit.paths import REPO_ROOT
from labkit.serve.launch import ServerProcess

EVAL_PYTHON = REPO_ROOT / ".venv-eval" / "bin" / "python"
DATA = REPO_ROOT / "tests" / "data" / "austen_mc.jsonl"
TASK = """task: austen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

pytestmark = pytest.mark.skipif(
    not EVAL_PYTHON.exists(), reason="no .venv-eval: build it with `make eval` (mk/eval.mk)"
)


def lm_eval(tmp_path, name: str, model: str, model_args: str) -> dict[tuple[int, int], float]:
    """Run lm-eval on the task; {(doc id, choice): loglikelihood} from its logged samples."""
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "austen_mc.yaml").write_text(TASK.format(data=DATA))
    out = tmp_path / name
    cmd = [
        str(EVAL_PYTHON),
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        "austen_mc",
        "--include_path",
        str(tasks),
        "--batch_size",
        "1",
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (samples,) = out.rglob("samples_austen_mc_*.jsonl")
    scores = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        for i, resp in enumerate(s["resps"]):
            scores[(s["doc_id"], i)] = float(resp[0][0])
    return scores


def test_lm_eval_through_the_server_equals_its_hf_backend(tmp_path):
    model_dir = resolve_model_name(None)
    hf = lm_eval(tmp_path, "hf", "hf", f"pretrained={model_dir},dtype=float32")
    with ServerProcess(threads=1) as srv:
        served = lm_eval(
            tmp_path,
            "served",
            "local-completions",
            f"model=course,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model_dir},num_concurrent=1,max_retries=1,tokenized_requests=True",
        )
    n_docs = len(DATA.read_text().splitlines())
    assert len(hf) == len(served) == 4 * n_docs
    worst = max(abs(hf[k] - served[k]) for k in hf)
    assert worst < 1e-3, f"largest loglikelihood difference {worst:.2e}"
