"""Real vLLM from the main environment: moved to labkit/workers/ (bench_client.py, bench_worker.py).

Kept so that `from labkit.engine.vllm_runner import PairedRunner, run_offline, vllm_available`
(notebook 06, benchmarks/engine.py, tests) goes on working.
"""

from ..workers.bench_client import PairedRunner, run_offline
from ..workers.venvs import vllm_available

__all__ = ["PairedRunner", "run_offline", "vllm_available"]
