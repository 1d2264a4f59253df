"""Run the production quantization libraries from the main environment, by subprocess.

GPTQModel, llm-compressor and torchao live in `.venv-quant` (`make quant-libs`, part of `make test`):
they pin versions of transformers and friends that must not leak into the course's main venv. Each run
executes labkit/quant/lib_runner.py there, which uses labkit's own calibration and evaluation code, so
its numbers compare directly with labkit's.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..paths import REPO_ROOT

QUANT_VENV = Path(os.environ.get("LABKIT_QUANT_VENV", REPO_ROOT / ".venv-quant"))


def library_python() -> Path | None:
    exe = QUANT_VENV / "bin" / "python"
    return exe if exe.exists() else None


def libraries_available() -> bool:
    return library_python() is not None


def run_library(task: str, timeout: int = 1200, **options) -> dict:
    """Run one lib_runner task (e.g. 'gptqmodel-gptq', bits=4, group_size=128, out='...'); return its JSON.

    Raises RuntimeError with the tail of the library's output if it fails or the venv is missing.
    """
    exe = library_python()
    if exe is None:
        raise RuntimeError(
            f"{QUANT_VENV} not found: build it with `make quant-libs` (part of `make test`)"
        )
    args = [str(exe), "-m", "labkit.quant.lib_runner", task]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:  # 0 is a value (e.g. eval_tokens=0: all)
            args += [flag, str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{task} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT:") :])
    result["wall_seconds"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":  # python -m labkit.quant.libs TASK [--option value ...]
    task, rest = sys.argv[1], sys.argv[2:]
    opts = {rest[i].lstrip("-").replace("-", "_"): rest[i + 1] for i in range(0, len(rest), 2)}
    print(json.dumps(run_library(task, **opts), indent=2))
