"""Open-loop load (labkit.serve.loadgen.openloop): arrivals, goodput, and a real server past saturation."""

import asyncio
import statistics

import pytest

from labkit.serve.launch import ServerProcess
from labkit.serve.loadgen import SLO, LoadResult, RequestRecord, goodput, poisson_arrivals, workload
from labkit.serve.loadgen.openloop import run_rate


def test_poisson_arrivals_are_increasing_with_mean_gap_one_over_rate():
    times = poisson_arrivals(4.0, 20_000, seed=3)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    assert times == poisson_arrivals(4.0, 20_000, seed=3)
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0, 5)


def test_goodput_counts_only_requests_within_the_slo():
    slo = SLO(ttft_s=0.5, tpot_s=0.05)
    records = [
        RequestRecord(ok=True, ttft=0.2, e2e=0.2 + 9 * 0.04, output_tokens=10),  # met
        RequestRecord(ok=True, ttft=0.6, e2e=0.7, output_tokens=3),  # TTFT too slow
        RequestRecord(ok=True, ttft=0.1, e2e=0.1 + 9 * 0.06, output_tokens=10),  # TPOT too slow
        RequestRecord(ok=True, ttft=0.1, e2e=0.1, output_tokens=1),  # one token: no TPOT, met
        RequestRecord(ok=False, status=429, retry_after="1"),  # refused
    ]
    assert [slo.met(r) for r in records] == [True, False, False, True, False]
    assert goodput(LoadResult(0, 2.0, records), slo) == pytest.approx(1.0)  # 2 met in 2 s
    s = LoadResult(0, 2.0, records).summary()
    assert (s["errors"], s["rejected_429"], s["rejected_429_with_retry_after"]) == (1, 1, 1)


def test_past_saturation_the_server_refuses_with_retry_after_and_bounds_its_queue():
    """Arrivals far faster than the server can answer: the queue stops at running + waiting limits,
    the rest get 429 + Retry-After, no 5xx, and every admitted request completes. Little's law holds
    between the clients' latencies and the server's running/waiting gauges."""
    max_running, max_waiting = 2, 2
    slo = SLO(ttft_s=60, tpot_s=10)
    with ServerProcess(max_num_seqs=max_running, max_waiting=max_waiting, threads=1) as srv:
        payloads = workload(60, seed=0, min_tokens=24, max_tokens=32)
        point = asyncio.run(run_rate(srv.url, payloads, rate=200.0, slo=slo, scrape_every=0.05))
        s = point.summary
        assert s["rejected_429"] > 0, s
        assert s["rejected_429_with_retry_after"] == s["rejected_429"]
        assert s["server_errors_5xx"] == 0
        assert s["ok"] + s["rejected_429"] == s["requests"], "every request answered or refused"
        assert point.max_in_system <= max_running + max_waiting

        # an unhurried rate: L measured from the gauges ~ lambda x W from the clients' latencies
        calm = asyncio.run(run_rate(srv.url, payloads[:16], rate=1.0, slo=slo, scrape_every=0.05))
        assert calm.summary["ok"] + calm.rejected == 16 and calm.summary["ok"] >= 8
        assert calm.mean_in_system == pytest.approx(calm.littles_law, rel=0.5, abs=0.3)
