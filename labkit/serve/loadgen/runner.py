"""N concurrent clients, each a closed loop (send, read the stream to the end, send the next), like
vLLM's and LLMPerf's benchmarks at fixed concurrency."""

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
