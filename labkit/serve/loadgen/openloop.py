"""Open-loop load: offered rate, saturation, goodput under an SLO, and Little's law.

A closed loop (run_load) can never overload a server: its clients slow down with it. Capacity questions
("how many requests per second can one replica take before users notice?") need an open loop: requests
arrive on their own schedule, a Poisson process at `rate` requests/s, the way `vllm bench serve
--request-rate` sends them. Raise the rate step by step past saturation and three regimes appear:
- below saturation, latency stays near its unloaded value (some queueing in the bursts);
- near saturation, the queue builds during every burst and the TTFT tail grows fast;
- past saturation, work arrives faster than it finishes: without a bound the queue (and TTFT) grows for
  as long as the overload lasts. `labkit serve` bounds it: beyond `--max-waiting` queued requests it
  answers 429 with Retry-After at once, so clients back off or go to another replica.

Goodput (the name comes from DistServe, Zhong et al., OSDI 2024) counts only the requests that finished
*within the SLO* (TTFT and TPOT bounds), per second: throughput that users did not experience as slow.

Little's law, L = lambda * W, ties the client's view to the server's gauges: the mean number of requests in
the server (running + waiting, time-averaged from /metrics) equals the rate at which requests complete
times the mean time each one spends inside. `RatePoint` reports both sides.
"""

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from ..metrics import parse_metrics
from .runner import run_open_loop
from .stats import LoadResult, RequestRecord

IN_SYSTEM = ("vllm:num_requests_running", "vllm:num_requests_waiting")  # gauges, summed


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of n requests arriving as a Poisson process of `rate`
    requests/s: independent exponential gaps with mean 1 / rate (`vllm bench serve`'s default
    burstiness of 1)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


@dataclass(frozen=True)
class SLO:
    """A service-level objective per request: first token within ttft_s, then at most tpot_s per token."""

    ttft_s: float
    tpot_s: float

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft is None or rec.ttft > self.ttft_s:
            return False
        return rec.tpot is None or rec.tpot <= self.tpot_s  # one-token answers have no TPOT


def goodput(result: LoadResult, slo: SLO) -> float:
    """Requests per second that completed within the SLO."""
    return sum(slo.met(r) for r in result.records) / result.wall if result.wall else 0.0


@dataclass
class RatePoint:
    """One offered rate of a sweep: what the clients saw, and the server's queue seen through /metrics."""

    rate: float  # offered, requests/s
    summary: dict  # LoadResult.summary() of the run
    goodput: float  # requests/s within the SLO
    slo_attained: float  # fraction of *sent* requests that finished within the SLO
    mean_in_system: float  # time-averaged running + waiting, from the server's gauges
    max_in_system: float
    littles_law: float  # completions/s x mean e2e: the L that Little's law predicts

    @property
    def rejected(self) -> int:
        return self.summary["rejected_429"]


async def sample_in_system(base_url: str, every: float, samples: list[float], stop: asyncio.Event):
    """Append running + waiting from /metrics every `every` s until `stop` is set."""
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            metrics = parse_metrics((await http.get(f"{base_url}/metrics")).text)
            samples.append(sum(metrics.get(name, 0.0) for name in IN_SYSTEM))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


async def run_rate(
    base_url: str,
    payloads: list[dict],
    rate: float,
    slo: SLO,
    seed: int = 0,
    scrape_every: float = 0.1,
    api_key: str | None = None,
) -> RatePoint:
    """Send `payloads` as Poisson arrivals at `rate` requests/s; measure goodput and the queue."""
    samples: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_in_system(base_url, scrape_every, samples, stop))
    start = time.perf_counter()
    result = await run_open_loop(
        base_url, payloads, poisson_arrivals(rate, len(payloads), seed), api_key
    )
    stop.set()
    await sampler
    ok = [r for r in result.records if r.ok and r.e2e is not None]
    wall = time.perf_counter() - start
    return RatePoint(
        rate=rate,
        summary=result.summary(),
        goodput=goodput(result, slo),
        slo_attained=sum(slo.met(r) for r in result.records) / max(1, len(result.records)),
        mean_in_system=sum(samples) / len(samples) if samples else float("nan"),
        max_in_system=max(samples, default=float("nan")),
        littles_law=sum(r.e2e for r in ok if r.e2e is not None) / wall,  # (n / wall) x mean(e2e)
    )


async def rate_sweep(
    base_url: str,
    payloads_for,
    rates: list[float],
    slo: SLO,
    seconds: float = 10.0,
    min_requests: int = 8,
    seed: int = 0,
) -> list[RatePoint]:
    """run_rate at each rate, lowest first, with about `seconds` of arrivals each:
    payloads_for(n) -> n payloads (e.g. lambda n: workload(n, seed=1))."""
    points = []
    for i, rate in enumerate(sorted(rates)):
        n = max(min_requests, round(rate * seconds))
        points.append(await run_rate(base_url, payloads_for(n), rate, slo, seed + i))
    return points
