"""Start a worker in its venv, send it requests, read its answers (see protocol.py for the format).

    with WorkerProcess(QUANT_PYTHON, "labkit.workers.quant_worker") as worker:
        result = worker.request({"task": "torchao-int8"})

The worker runs `python -m MODULE` with labkit's source on PYTHONPATH, so it imports labkit without
labkit being installed in that venv. Its stderr goes to a file, shown when a request fails.
"""

import collections
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from ..paths import REPO_ROOT
from .protocol import encode_request, parse_answer


class WorkerError(RuntimeError):
    """A worker failed a request, died, or ran past its timeout; the message ends with its log."""


class WorkerProcess:
    def __init__(
        self, python: str | Path, module: str, env: dict | None = None, cwd: str | Path = REPO_ROOT
    ):
        self.module = module
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "TQDM_DISABLE": "1", **(env or {})}
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr
        self.other_lines: collections.deque[str] = collections.deque(maxlen=40)  # unmarked stdout
        self.proc = subprocess.Popen(
            [str(python), "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=cwd,
        )

    def request(self, request: dict, timeout: float | None = None) -> dict:
        """Send one request and wait for its answer; raise WorkerError if it fails or takes too long."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill) if timeout else None
        try:
            if timer:
                timer.start()
            self.proc.stdin.write(encode_request(request))
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                answer = parse_answer(line)
                if answer is None:
                    self.other_lines.append(line)
                elif "error" in answer:
                    raise WorkerError(f"{self.module}: {answer['error']}\n{self.tail(answer)}")
                else:
                    return answer
        except BrokenPipeError:
            pass  # the worker is gone: say so below, with its log
        finally:
            if timer:
                timer.cancel()
        code = self.proc.wait(timeout=60)
        why = f"killed after {timeout} s" if timer and code < 0 else f"exited with code {code}"
        raise WorkerError(f"{self.module} {why} without an answer:\n{self.tail()}")

    def tail(self, answer: dict | None = None, chars: int = 3000) -> str:
        """The end of what the worker printed (its traceback first, when it sent one)."""
        self.log.seek(0)
        text = "".join(self.other_lines) + self.log.read()
        if answer and answer.get("traceback"):
            text += answer["traceback"]
        return text[-chars:]

    def close(self) -> None:
        """Close the worker's stdin (it exits when it has answered everything) and wait for it."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_worker(
    python: str | Path, module: str, request: dict, timeout: float | None = None, **kwargs
) -> dict:
    """Start a worker, send it one request, return its answer, let it exit."""
    with WorkerProcess(python, module, **kwargs) as worker:
        return worker.request(request, timeout=timeout)
