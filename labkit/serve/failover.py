"""A replica dies under load, behind the load balancer: what the clients saw, and how fast traffic moved.

    report = await kill_under_load(replicas, lb, payloads, concurrency=64, kill_after=2.0, victim=1)
    report.outcomes   # {"answered": 250, "cut": 5, "refused_503": 0, "lost": 0}

Every request ends in one of four ways (`outcome`):
- answered     200 and the stream reached [DONE], perhaps after HAProxy retried it on another replica;
- cut          200 and the stream started, then ended without [DONE]: the replica died while sending
               it. Nobody can retry it transparently (the client already has part of the answer); the
               client sees an error and decides (the load generator counts it as one);
- refused_503  a 503 with a JSON error body: no replica could take it (retries used up), a clear answer;
- lost         anything else: no response at all, a bare connection reset, a 502... What the load
               balancer's retries are for: a request that never got a response byte must not end here.

Invariant (tests/test_serve_balancer.py, benchmarks/scaleout.py): lost == 0, and every cut stream the
clients report matches one HAProxy logged as cut by the server ("SD": server aborted during data).
"""

import asyncio
import re
import time
from dataclasses import dataclass, field

from .balancer import LoadBalancer
from .loadgen.runner import run_load
from .loadgen.stats import LoadResult, RequestRecord
from .replicas import Replicas

OUTCOMES = ("answered", "cut", "refused_503", "lost")


def outcome(rec: RequestRecord) -> str:
    if rec.ok:
        return "answered"
    if rec.status == 200:
        return "cut"
    if rec.status == 503 and rec.error and '"message"' in rec.error:
        return "refused_503"
    return "lost"


@dataclass
class FailoverReport:
    graceful: bool  # SIGTERM (drain) rather than SIGKILL (crash)
    load: LoadResult
    outcomes: dict[str, int]
    retried: int  # requests HAProxy sent again (its log's retries field > 0)
    redispatched: int  # the same seen in HAProxy's stats: retries sent to another replica (wredis)
    cut_by_server: int  # requests HAProxy logged as cut by the dying replica mid-response
    time_to_down: float | None  # seconds from the signal to HAProxy's DOWN (None: never seen)
    sent_to_victim_after_down: int  # requests HAProxy routed to the dead replica after DOWN
    health_log: list[str] = field(default_factory=list)  # HAProxy's lines about server state

    @property
    def lost_unstarted(self) -> int:
        return self.outcomes["lost"]


async def kill_under_load(
    replicas: Replicas,
    lb: LoadBalancer,
    payloads: list[dict],
    concurrency: int,
    kill_after: float,
    victim: int = 1,
    graceful: bool = False,
    poll: float = 0.05,
) -> FailoverReport:
    """Run `payloads` through the load balancer with `concurrency` clients; `kill_after` seconds in,
    kill replica `victim` (SIGKILL, or SIGTERM if graceful) and watch HAProxy's stats every `poll` s
    until it marks the replica DOWN."""
    name = f"r{victim}"
    log_start = len(lb.output())
    redispatched_before = int(lb.server_stats()["BACKEND"]["wredis"])
    load = asyncio.ensure_future(run_load(lb.url, payloads, concurrency))
    await asyncio.sleep(kill_after)
    killed = time.perf_counter()
    await asyncio.to_thread(replicas.kill, victim, graceful)
    time_to_down, stot_at_down = None, 0
    while not load.done():
        row = (await asyncio.to_thread(lb.server_stats))[name]
        if row["status"].startswith("DOWN"):
            time_to_down, stot_at_down = time.perf_counter() - killed, int(row["stot"])
            break
        await asyncio.sleep(poll)
    result = await load
    stats_after = await asyncio.to_thread(lb.server_stats)
    stot_after = int(stats_after[name]["stot"])
    # HAProxy logs each request once, retries included, as it ends: wait for every line to be written
    requests = await asyncio.to_thread(lb.request_lines, len(result.records), log_start)
    lines = lb.output()[log_start:].splitlines()
    retried = sum(1 for ln in requests if not re.search(r" retries=0 ", ln))
    cut = sum(1 for ln in requests if f"server={name} " in ln and " state=SD" in ln)
    outcomes = dict.fromkeys(OUTCOMES, 0)
    for rec in result.records:
        outcomes[outcome(rec)] += 1
    return FailoverReport(
        graceful=graceful,
        load=result,
        outcomes=outcomes,
        retried=retried,
        redispatched=int(stats_after["BACKEND"]["wredis"]) - redispatched_before,
        cut_by_server=cut,
        time_to_down=time_to_down,
        sent_to_victim_after_down=stot_after - stot_at_down if time_to_down is not None else 0,
        health_log=[ln for ln in lines if "is DOWN" in ln or "is UP" in ln],
    )
