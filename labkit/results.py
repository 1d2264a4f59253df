"""Measured numbers, never separated from when and where they were measured.

- results/<name>.json (git-ignored): what a notebook or benchmark measured on *this* machine; later
  notebooks build on it (notebook 09's cost model reads 07's serving figures).
- benchmarks/results/<name>.json (committed): a benchmark's latest record, with the date, the git commit,
  the machine, the command, the figures and `targets_met` (target name -> true/false), so the README and
  reviewers can cite a run.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .paths import REPO_ROOT, RESULTS_DIR

RECORDS_DIR = REPO_ROOT / "benchmarks" / "results"


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
    # write, then rename: a notebook reading it (09 reads 07's) never sees a half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=float))
    os.replace(tmp, path)
    return str(path)


def load_result(name: str) -> dict | None:
    """The saved record, or None if that notebook/benchmark has not been run on this machine yet."""
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def git_commit() -> str:
    """The commit the working tree is at (with '+dirty' when it has uncommitted changes)."""
    try:
        run = lambda *a: subprocess.check_output(["git", *a], cwd=REPO_ROOT, text=True).strip()  # noqa: E731
        return run("rev-parse", "HEAD") + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """CPU model, cores, torch threads, the SIMD level torch uses, the GPU if any, the load right now."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }


def save_record(name: str, figures: dict, targets_met: dict[str, bool], **context) -> Path:
    """Write a benchmark's committed record (and the same figures to results/<name>.json)."""
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "targets_met": targets_met,
        **context,
        "figures": figures,
    }
    save_result(name, record)
    RECORDS_DIR.mkdir(parents=True, exist_ok=True)
    path = RECORDS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path
