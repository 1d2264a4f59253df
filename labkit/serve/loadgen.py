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
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str | None = None
    disconnected: bool = False   # we hung up on purpose (disconnect tests)

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
        s = {"concurrency": self.concurrency, "requests": len(self.records), "ok": len(ok),
             "errors": sum(1 for r in self.records if not r.ok and not r.disconnected),
             "disconnected": sum(1 for r in self.records if r.disconnected),
             "output_tokens": out, "wall_s": self.wall,
             "throughput_tok_s": out / self.wall if self.wall else 0.0,
             "requests_per_s": len(ok) / self.wall if self.wall else 0.0}
        for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok if r.tpot is not None]),
                             ("e2e", [r.e2e for r in ok])):
            for q in (50, 95, 99):
                s[f"{name}_p{q}_s"] = percentile(values, q)
            s[f"{name}_mean_s"] = statistics.fmean(values) if values else float("nan")
        return s


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict,
                            disconnect_after: int | None = None) -> RequestRecord:
    """POST one streaming completion and time it. disconnect_after=k hangs up after k chunks."""
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    rec, chunks, text = RequestRecord(ok=False), 0, []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return rec
            # SSE events end with a blank line. Splitting the raw bytes ourselves (instead of aiter_lines, which
            # decodes and re-splits every line) keeps the client's CPU per token low: on a 2-core machine the
            # load generator competes with the server it measures.
            buf, finished = b"", False
            async for data in resp.aiter_raw():
                buf += data
                if b"\r" in data:                   # CRLF line ends (allowed by the SSE spec)
                    buf = buf.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if not ev.startswith(b"data: "):
                        continue
                    data = ev[6:]
                    if data == b"[DONE]":
                        rec.ok = finished = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        rec.error = event["error"]["message"]
                        return rec
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
                        return rec      # leaving the `async with` closes the connection mid-stream
                if finished:
                    break
        if not rec.ok:
            rec.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    finally:
        rec.e2e = time.perf_counter() - start
        rec.text = "".join(text)
    return rec


async def run_load(base_url: str, payloads: list[dict], concurrency: int, disconnect_prob: float = 0.0,
                   seed: int = 0, api_key: str | None = None, timeout: float = 300.0) -> LoadResult:
    """Send every payload once, `concurrency` at a time (each worker takes the next from a shared queue).

    disconnect_prob > 0: each request hangs up after a random number of chunks with that probability."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    rng = random.Random(seed)
    plan = [(p, rng.randint(1, max(1, p.get("max_tokens", 16))) if rng.random() < disconnect_prob else None)
            for p in payloads]
    todo: asyncio.Queue = asyncio.Queue()
    for item in plan:
        todo.put_nowait(item)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        async def worker():
            while not todo.empty():
                payload, cut = todo.get_nowait()
                records.append(await stream_completion(client, base_url + "/v1/completions", payload, cut))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LoadResult(concurrency, wall, records)


def run_load_sync(*args, **kwargs) -> LoadResult:
    """run_load from plain (non-async) code. In Jupyter use `await run_load(...)` instead."""
    return asyncio.run(run_load(*args, **kwargs))


def workload(n: int, seed: int = 0, min_tokens: int = 16, max_tokens: int = 64, model: str = "course") -> list[dict]:
    """n seeded completion requests: realistic prompts of mixed length, mixed fixed output lengths
    (ignore_eos, greedy), so the server and the offline engine do exactly the same work."""
    from labkit.data import sample_prompts
    rng = random.Random(seed)
    return [{"model": model, "prompt": p, "max_tokens": rng.randint(min_tokens, max_tokens), "temperature": 0.0,
             "ignore_eos": True} for p in sample_prompts(n, seed)]


# ---- plots ----------------------------------------------------------------------------------------

def plot_latency_cdf(results: list[LoadResult], metric: str = "ttft", ax=None):
    """Empirical CDF of TTFT / TPOT / e2e, one line per concurrency level."""
    import matplotlib.pyplot as plt
    ax = ax or plt.gca()
    for res in results:
        values = sorted(v for v in (getattr(r, metric) for r in res.records if r.ok) if v is not None)
        if values:
            ax.step([v * 1e3 for v in values], [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"{res.concurrency} clients")
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
    ax.plot(xs, [s["throughput_tok_s"] for s in summaries], "o-", label="server (streaming clients)")
    if offline_tok_s:
        ax.axhline(offline_tok_s, color="gray", ls="--", label="offline engine, same workload")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
