"""Moved to labkit/workers/bench_worker.py. Kept for notebook 06, which prints `offline_bench.main`'s
source to show that only the import differs between the engines: that is `bench_worker.start`."""

from ..workers.bench_worker import start as main

__all__ = ["main"]
