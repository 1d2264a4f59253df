"""Run the production quantization libraries from the main environment: quant_worker in .venv-quant.

GPTQModel, llm-compressor and torchao live in `.venv-quant` (`make quant-libs`, part of `make test`):
they pin versions of transformers and friends that must not leak into the course's main venv.
"""

import os
import time

from .client import run_worker
from .venvs import QUANT_PYTHON, QUANT_VENV, libraries_available

# read by the libraries (and huggingface_hub) when they are imported, so set before the worker starts
WORKER_ENV = {
    "GPTQMODEL_CPU_WORKERS": str(min(2, os.cpu_count() or 1)),
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",  # the libraries warn at length on import; their results are what we read
}


def run_library(task: str, timeout: float = 1200, **options) -> dict:
    """Run one quant_worker task (e.g. 'gptqmodel-gptq', bits=4, group_size=128, out='...'); return
    what it measured, plus wall_seconds. Raises WorkerError with the library's output if it fails."""
    if not libraries_available():
        raise RuntimeError(
            f"{QUANT_VENV} not found: build it with `make quant-libs` (part of `make test`)"
        )
    env = {**WORKER_ENV, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}}
    t0 = time.perf_counter()
    result = run_worker(
        QUANT_PYTHON, "labkit.workers.quant_worker", {"task": task, **options}, timeout, env=env
    )
    result["wall_seconds"] = time.perf_counter() - t0
    return result
