"""Structured access logs: one JSON line per HTTP request, for the questions metrics cannot answer.

/metrics says that p99 TTFT went up; the access log says *whose* requests were slow, which got 429s,
and which client hung up. One line per request, machine-readable (jq, pandas, a log pipeline):

    {"time": "2026-12-02T10:15:03.123Z", "request_id": "b1c...", "method": "POST",
     "path": "/v1/completions", "status": 200, "key_id": "team-a", "prompt_tokens": 12,
     "completion_tokens": 32, "ttft_s": 0.084, "duration_s": 0.91, "disconnected": false,
     "cached": false, "error": null}

- `request_id` is the client's `X-Request-Id` when it sent a sane one (so its own logs and ours join on
  it), else a fresh one; either way it is echoed in the `X-Request-Id` response header.
- `key_id`, never the key: a log is read by more people than should hold the keys.
- No prompt or completion text unless asked for (--access-log-text): they are the tenants' data.
- `ttft_s` is the time to the first byte of the response body: for a stream, the first chunk (the
  server waits for the first token before it sends headers); otherwise the whole answer.
- Writing must never fail a request: a full disk or a closed stdout is counted
  (labkit:access_log_dropped_lines) and the line dropped.

A pure ASGI middleware (it does not buffer streams), always installed: it gives each request an
`Exchange` in the ASGI scope's state, which the routes fill in (key id, token counts, cache hit) and
use to add response headers and to run clean-ups when the exchange ends however it ends (the rate
limiter's refunds). The log line is written only when a sink is configured.
"""

import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter

SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass
class Exchange:
    """One request/response, as the routes describe it. Found at scope["state"]["exchange"]."""

    request_id: str
    key_id: str | None = None
    prompt_tokens: int | None = None  # set once the request ran (engine or cache)
    choices: list = field(default_factory=list)  # the Choices being generated: tokens so far
    cached_body: dict | None = None  # a response-cache hit: the cached choices and usage
    error: str | None = None  # an error's code (or type) sent in-band after a 200 (streams)
    prompt: Any = None  # what the client asked (logged only with --access-log-text)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response's headers
    on_end: list[Callable[["Exchange"], None]] = field(default_factory=list)
    lora: str | None = (
        None  # the LoRA adapter the request named as its model (None: the base model)
    )

    @property
    def completion_tokens(self) -> int | None:
        if self.cached_body is not None:
            return self.cached_body["usage"]["completion_tokens"]
        return sum(c.num_tokens for c in self.choices) if self.choices else None

    def completion_text(self) -> list[str] | None:
        if self.cached_body is not None:
            return [
                c.get("text", c.get("message", {}).get("content"))
                for c in self.cached_body["choices"]
            ]
        return [c.text for c in self.choices] if self.choices else None


class AccessLog:
    """Where the lines go: a path (appended), "-" for stdout, or None for no log."""

    def __init__(self, path: str | None, with_text: bool, registry: CollectorRegistry):
        self.with_text = with_text
        self.stream: IO[str] | None = None
        if path == "-":
            self.stream = sys.stdout
        elif path:
            self.stream = open(path, "a", buffering=1, encoding="utf-8")
        self.dropped = Counter(
            "labkit:access_log_dropped_lines",
            "Access-log lines that could not be written (disk full, closed stdout)",
            registry=registry,
        )

    def write(self, line: dict) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(line, default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.dropped.inc()


class AccessLogMiddleware:
    def __init__(self, app, log: AccessLog):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, wall = time.perf_counter(), time.time()
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        exchange = Exchange(given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["exchange"] = exchange
        seen: dict[str, Any] = {"status": 500, "ttft": None, "complete": False, "error_body": b""}
        seen["disconnected"] = False

        async def receive_wrapper():
            message = await receive()
            if message["type"] == "http.disconnect" and not seen["complete"]:
                seen["disconnected"] = True
            return message

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", exchange.request_id.encode()))
                headers += [(k.encode(), v.encode()) for k, v in exchange.headers.items()]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and seen["ttft"] is None:
                    seen["ttft"] = time.perf_counter() - start
                if seen["status"] >= 400 and len(seen["error_body"]) < 4096:
                    seen["error_body"] += body
                if not message.get("more_body", False):
                    seen["complete"] = True
            try:
                await send(message)
            except OSError:
                seen["disconnected"] = True
                raise

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            for clean_up in exchange.on_end:
                clean_up(exchange)
            if self.log.stream is not None:
                self.log.write(self.line(scope, exchange, seen, wall, start))

    def line(self, scope, exchange: Exchange, seen: dict, wall: float, start: float) -> dict:
        status = seen["status"]
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall))
            + f".{int(wall % 1 * 1000):03d}Z",
            "request_id": exchange.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "key_id": exchange.key_id,
            "prompt_tokens": exchange.prompt_tokens,
            "completion_tokens": exchange.completion_tokens,
            "ttft_s": seen["ttft"],
            "duration_s": time.perf_counter() - start,
            "disconnected": seen["disconnected"] or status == 499,
            "cached": exchange.cached_body is not None,
            "error": exchange.error or (error_code(seen["error_body"]) if status >= 400 else None),
        }
        if self.log.with_text:
            line["prompt"] = exchange.prompt
            line["completion"] = exchange.completion_text()
        return line


def error_code(body: bytes) -> str | None:
    """The `code` (else `type`) of an OpenAI-shaped error body."""
    try:
        error = json.loads(body)["error"]
        return error.get("code") or error.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
