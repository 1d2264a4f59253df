"""Two ways to load a server.

run_load: N concurrent clients, each a closed loop (send, read the stream to the end, send the next), like
LLMPerf's benchmarks and `vllm bench serve --max-concurrency`: the server never holds more than N requests,
so queueing stays hidden. run_open_loop: requests sent at given times whether or not earlier ones have
finished, like real users and `vllm bench serve --request-rate` (Poisson arrivals): queueing shows."""

import asyncio
import random
import time
import urllib.parse

from .client import Connection, stream_completion
from .stats import LoadResult, RequestRecord


async def run_load(
    base_url: str,
    payloads: list[dict],
    concurrency: int,
    disconnect_prob: float = 0.0,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 300.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send every payload once, `concurrency` at a time (each worker takes the next from a shared queue,
    over its own keep-alive connection).

    disconnect_prob > 0: each request hangs up after a random number of chunks with that probability.
    headers: sent with every request (with api_key's Authorization), e.g. X-Request-Id."""
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
    headers = auth_headers(api_key, headers)
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


async def run_open_loop(
    base_url: str,
    payloads: list[dict],
    arrivals: list[float],
    api_key: str | None = None,
    timeout: float = 300.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send payloads[i] at arrivals[i] seconds after the start (e.g. Poisson arrivals), each on a
    connection of its own, without waiting for earlier ones. Latencies count from the *scheduled* time,
    so a send that leaves late (a busy client) is not hidden (no coordinated omission). In the result,
    concurrency is 0: an open loop has no fixed number of clients. headers: as in run_load."""
    if len(arrivals) != len(payloads):
        raise ValueError(
            f"need one arrival time per payload, got {len(arrivals)} for {len(payloads)}"
        )
    headers = auth_headers(api_key, headers)
    path = urllib.parse.urlsplit(base_url).path.rstrip("/") + "/v1/completions"
    start = time.perf_counter()

    async def one(payload: dict, at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        late = time.perf_counter() - start - at
        conn = Connection(base_url, headers)
        try:
            rec = await stream_completion(conn, path, payload, None, timeout)
        finally:
            conn.close()
        rec.ttft = None if rec.ttft is None else rec.ttft + late
        rec.e2e = None if rec.e2e is None else rec.e2e + late
        return rec

    records = await asyncio.gather(*(one(p, at) for p, at in zip(payloads, arrivals)))
    return LoadResult(0, time.perf_counter() - start, list(records))


def auth_headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    return {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def run_load_sync(*args, **kwargs) -> LoadResult:
    """run_load from plain (non-async) code. In Jupyter use `await run_load(...)` instead."""
    return asyncio.run(run_load(*args, **kwargs))
