"""A load generator: N concurrent clients streaming completions, timed the way serving papers do.

    TTFT  time to first token: request sent -> first text chunk (queueing + prefill)
    TPOT  time per output token after the first: (e2e - TTFT) / (output tokens - 1)  (decode speed seen)
    e2e   request sent -> last chunk
    throughput  output tokens of all requests / wall time of the whole run

Each client is a closed loop (send, read the stream to the end, send the next), like vLLM's and
LLMPerf's benchmarks at fixed concurrency. A request that fails, or ends without its [DONE], counts
as an error: a server that silently loses requests must not look fast.
"""

import asyncio
import json
import random
import statistics
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str | None = None
    disconnected: bool = False  # we hung up on purpose (disconnect tests)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LoadResult:
    concurrency: int
    wall: float
    records: list[RequestRecord] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.records if r.ok]
        out = sum(r.output_tokens for r in ok)
        s = {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "ok": len(ok),
            "errors": sum(1 for r in self.records if not r.ok and not r.disconnected),
            "disconnected": sum(1 for r in self.records if r.disconnected),
            "output_tokens": out,
            "wall_s": self.wall,
            "throughput_tok_s": out / self.wall if self.wall else 0.0,
            "requests_per_s": len(ok) / self.wall if self.wall else 0.0,
        }
        for name, values in (
            ("ttft", [r.ttft for r in ok]),
            ("tpot", [r.tpot for r in ok if r.tpot is not None]),
            ("e2e", [r.e2e for r in ok]),
        ):
            for q in (50, 95, 99):
                s[f"{name}_p{q}_s"] = percentile(values, q)
            s[f"{name}_mean_s"] = statistics.fmean(values) if values else float("nan")
        return s


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
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + data)
                status_line = await self.reader.readline()
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
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            self.headers[key.strip().lower()] = value.strip()
        return status

    async def body(self):
        """The response body, piece by piece as it arrives."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                chunk = await self.reader.readexactly(size + 2)  # data + its trailing \r\n
                yield chunk[:-2]
            await self.reader.readline()  # the blank line that ends the body
        elif length := int(self.headers.get("content-length", 0)):
            yield await self.reader.readexactly(length)
        if self.headers.get("connection", "").lower() == "close":
            self.close()

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
        if (status := await conn.post(path, body)) != 200:
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


async def run_load(
    base_url: str,
    payloads: list[dict],
    concurrency: int,
    disconnect_prob: float = 0.0,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> LoadResult:
    """Send every payload once, `concurrency` at a time (each worker takes the next from a shared queue,
    over its own keep-alive connection).

    disconnect_prob > 0: each request hangs up after a random number of chunks with that probability."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    rng = random.Random(seed)
    plan = [
        (
            p,
            rng.randint(1, max(1, p.get("max_tokens", 16)))
            if rng.random() < disconnect_prob
            else None,
        )
        for p in payloads
    ]
    todo: asyncio.Queue = asyncio.Queue()
    for item in plan:
        todo.put_nowait(item)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = urllib.parse.urlsplit(base_url).path.rstrip("/") + "/v1/completions"
    records: list[RequestRecord] = []

    async def worker():
        conn = Connection(base_url, headers)
        try:
            while not todo.empty():
                payload, cut = todo.get_nowait()
                records.append(await stream_completion(conn, path, payload, cut, timeout))
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return LoadResult(concurrency, wall, records)


def run_load_sync(*args, **kwargs) -> LoadResult:
    """run_load from plain (non-async) code. In Jupyter use `await run_load(...)` instead."""
    return asyncio.run(run_load(*args, **kwargs))


def workload(
    n: int, seed: int = 0, min_tokens: int = 16, max_tokens: int = 64, model: str = "course"
) -> list[dict]:
    """n seeded completion requests: realistic prompts of mixed length, mixed fixed output lengths
    (ignore_eos, greedy), so the server and the offline engine do exactly the same work."""
    from labkit.data import sample_prompts

    rng = random.Random(seed)
    return [
        {
            "model": model,
            "prompt": p,
            "max_tokens": rng.randint(min_tokens, max_tokens),
            "temperature": 0.0,
            "ignore_eos": True,
        }
        for p in sample_prompts(n, seed)
    ]


# ---- plots ----------------------------------------------------------------------------------------


def plot_latency_cdf(results: list[LoadResult], metric: str = "ttft", ax=None):
    """Empirical CDF of TTFT / TPOT / e2e, one line per concurrency level."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    for res in results:
        values = sorted(
            v for v in (getattr(r, metric) for r in res.records if r.ok) if v is not None
        )
        if values:
            ax.step(
                [v * 1e3 for v in values],
                [(i + 1) / len(values) for i in range(len(values))],
                where="post",
                label=f"{res.concurrency} clients",
            )
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{metric.upper()} CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_throughput(summaries: list[dict], offline_tok_s: float | None = None, ax=None):
    """Output tokens/s vs number of concurrent clients (and the offline engine's, as a line)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    xs = [s["concurrency"] for s in summaries]
    ax.plot(
        xs, [s["throughput_tok_s"] for s in summaries], "o-", label="server (streaming clients)"
    )
    if offline_tok_s:
        ax.axhline(offline_tok_s, color="gray", ls="--", label="offline engine, same workload")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
