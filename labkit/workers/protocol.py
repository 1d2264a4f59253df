"""The one wire format between labkit and its workers: JSON lines, one request in, one answer out.

The client writes each request as one JSON object on one line of the worker's stdin. The worker
answers each request with one JSON object on one line of its stdout, prefixed by MARK: the libraries
it runs print their own logs on the same stdout, and the mark tells our lines from theirs. A request
that fails is answered {"error": "...", "traceback": "..."}, and the worker goes on to the next.
The worker exits when its stdin closes.

Standard library only: this module runs in every venv.
"""

import json
import sys
import traceback
from collections.abc import Callable, Iterable

MARK = "@@labkit-worker "


def encode_request(request: dict) -> str:
    """One request line; paths and other plain objects become strings."""
    return json.dumps(request, default=str) + "\n"


def write_answer(answer: dict, stream=None) -> None:
    """Print one marked answer line (numbers such as numpy or 0-d tensor values become floats)."""
    print(MARK + json.dumps(answer, default=float), file=stream or sys.stdout, flush=True)


def parse_answer(line: str) -> dict | None:
    """The answer on a stdout line, or None for a line that is not ours (a library's log)."""
    return json.loads(line[len(MARK) :]) if line.startswith(MARK) else None


def serve(handle: Callable[[dict], dict], requests: Iterable[str] | None = None) -> None:
    """The worker's loop: answer each request line with handle(request), or with the error it raised."""
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except Exception as err:  # reported to the client, which raises it with the worker's log
            answer = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        write_answer(answer)
