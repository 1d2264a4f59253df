"""Just enough HTTP for a streaming POST, and one streaming completion timed on it.

A request that fails, or ends without its [DONE], counts as an error: a server that silently loses
requests must not look fast.
"""

import asyncio
import json
import time
import urllib.parse

from .stats import RequestRecord


class Connection:
    """One keep-alive HTTP/1.1 connection to the server: just enough HTTP for a streaming POST.

    Why not httpx (which the tests and notebooks use for everything else): for every SSE chunk it runs
    some twenty layers of Python (anyio, httpcore, h11, timeout scopes), measured at ~110 us of client
    CPU per generated token, more than the server's own HTTP work. On a 2-core machine the load generator
    competes with the server it measures, so here the response is read straight off an asyncio stream:
    a status line, headers, then the body in chunked transfer encoding (`<hex size>\r\n<data>\r\n`,
    ending with a zero-size chunk), which is how a streaming response travels in HTTP/1.1."""

    def __init__(self, base_url: str, headers: dict | None = None):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http":
            raise ValueError(f"the load generator speaks plain http://, got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.headers: dict[str, str] = {}

    async def post(self, path: str, body: dict) -> int:
        """Send a JSON POST and read the status line and headers; returns the status code."""
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{self.extra}\r\n"
        ).encode()
        for attempt in (0, 1):
            reader, writer, reused = await self._connect()
            try:
                writer.write(head + data)
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionError("the server closed the connection")
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                # a fresh connection failed: a real error. A reused keep-alive
                if not reused or attempt:
                    raise  # connection the server had closed meanwhile: retry once
        status = int(status_line.split()[1])
        self.headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            self.headers[key.strip().lower()] = value.strip()
        return status

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """The open connection (reused: True), or a new one."""
        if self.reader is not None and self.writer is not None:
            return self.reader, self.writer, True
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer, False

    async def body(self):
        """The response body, piece by piece as it arrives."""
        reader = self.reader
        if reader is None:
            raise ConnectionError("no response to read: the connection is closed (post() first)")
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self._line(reader)).split(b";")[0], 16):
                chunk = await reader.readexactly(size + 2)  # data + its trailing \r\n
                yield chunk[:-2]
            await reader.readline()  # the blank line that ends the body
        elif length := int(self.headers.get("content-length", 0)):
            yield await reader.readexactly(length)
        if self.headers.get("connection", "").lower() == "close":
            self.close()

    @staticmethod
    async def _line(reader: asyncio.StreamReader) -> bytes:
        """One line of a chunked body; the connection closing instead (a server that died mid-stream)
        is an error that says so."""
        line = await reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection in the middle of the response")
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def stream_completion(
    conn: Connection,
    path: str,
    payload: dict,
    disconnect_after: int | None = None,
    timeout: float = 300.0,
) -> RequestRecord:
    """POST one streaming completion and time it. disconnect_after=k hangs up after k chunks."""
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    rec, text = RequestRecord(ok=False), []

    async def run():
        rec.status = status = await conn.post(path, body)
        rec.retry_after = conn.headers.get("retry-after")
        if status != 200:
            rec.error = f"HTTP {status}: {b''.join([b async for b in conn.body()]).decode()[:200]}"
            return
        # SSE events end with a blank line
        buf, chunks = b"", 0
        async for data in conn.body():
            buf += data
            if b"\r" in data:  # CRLF line ends (allowed by the SSE spec)
                buf = buf.replace(b"\r\n", b"\n")
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    rec.ok = True
                    continue  # read on to the end of the body: the connection is reused
                event = json.loads(data)
                if "error" in event:
                    rec.error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    rec.prompt_tokens = event["usage"]["prompt_tokens"]
                    rec.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", ()):
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if rec.ttft is None and (piece or choice.get("finish_reason")):
                        rec.ttft = time.perf_counter() - start
                    text.append(piece)
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    rec.disconnected = True
                    conn.close()  # hang up mid-stream
                    return
        if not rec.ok and rec.error is None:
            rec.error = "stream ended without [DONE]"

    try:
        await asyncio.wait_for(run(), timeout)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as err:
        conn.close()  # the connection is in an unknown state: do not reuse it
        rec.error = f"{type(err).__name__}: {err}"
    finally:
        rec.e2e = time.perf_counter() - start
        rec.text = "".join(text)
        if rec.error:
            rec.ok = False
    return rec
