"""llama.cpp's batch-1 decode speed on a GGUF file, from the main venv: llama_worker in .venv-llama."""

from .client import run_worker
from .venvs import LLAMA_PYTHON, LLAMA_VENV


def llama_available() -> tuple[bool, str]:
    """(True, the llama.cpp venv's python) or (False, what to run to build it). The venv counts once
    `make llama` has finished it (its stamp): llama.cpp compiles for minutes before that."""
    if not (LLAMA_PYTHON.exists() and (LLAMA_VENV / ".installed").exists()):
        return (
            False,
            f"{LLAMA_VENV} is not built (or still building): run `make llama` (mk/llama.mk)",
        )
    return True, str(LLAMA_PYTHON)


def decode_speed(
    gguf, prompt_ids: list[int], new_tokens: int, threads: int, rounds: int = 3
) -> dict:
    """{'tokens_per_s': [one per round], 'token_ids': greedy ids, ...} measured by llama_worker."""
    ok, why = llama_available()
    if not ok:
        raise RuntimeError(why)
    request = dict(
        gguf=str(gguf), prompt_ids=prompt_ids, new_tokens=new_tokens, threads=threads, rounds=rounds
    )
    return run_worker(LLAMA_PYTHON, "labkit.workers.llama_worker", request, timeout=600)
