"""Measured numbers that later notebooks build on (e.g. notebook 09's cost model) live in results/*.json.

Every file records when and where it was measured, so a number is never separated from its context.
"""

import json
import platform
import time

import torch

from .paths import RESULTS_DIR


def save_result(name: str, data: dict) -> str:
    RESULTS_DIR.mkdir(exist_ok=True)
    record = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "torch": torch.__version__,
        **data,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=float))
    return str(path)


def load_result(name: str) -> dict | None:
    """The saved record, or None if that notebook/benchmark has not been run on this machine yet."""
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
