"""Exercise checks for notebooks 07-09 (built on labkit.checks.run_check): each returns the student's
function if it is right, else the reference below, so the notebook always runs to the end."""

import bisect
import json
import math
import random
import statistics
from collections.abc import Callable

from labkit.checks import ExerciseFailure, expect_close, run_check
from labkit.serve.loadgen.openloop import poisson_arrivals

# ---- notebook 07: reading a stream -----------------------------------------------------------------


def reference_parse_sse(lines: list[str]) -> tuple[str, str | None]:
    """Text and finish_reason of an OpenAI completion stream given as SSE lines ('data: {...}')."""
    text, reason = [], None
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        for choice in event.get("choices", []):
            text.append(choice.get("text") or "")
            reason = choice.get("finish_reason") or reason
    return "".join(text), reason


def _sse(*events) -> list[str]:
    lines = []
    for e in events:
        lines += [f"data: {json.dumps(e)}", ""]
    return lines + ["data: [DONE]", ""]


def _chunk(text, reason=None):
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": reason}],
    }


def check_parse_sse(student: Callable) -> Callable:
    def test(fn):
        cases = [
            (
                _sse(_chunk(" It"), _chunk(" was"), _chunk(" raining", "length")),
                (" It was raining", "length"),
            ),
            (
                _sse(
                    _chunk("Yes", "stop"),
                    {
                        "object": "text_completion",
                        "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                    },
                ),
                ("Yes", "stop"),
            ),
            (
                [": keep-alive comment", ""] + _sse(_chunk(""), _chunk("é"), _chunk("!", "stop")),
                ("é!", "stop"),
            ),
        ]
        for lines, want in cases:
            got = fn(lines)
            if tuple(got) != want:
                raise ExerciseFailure(
                    f"for a stream of {len(lines)} lines expected {want!r}, got {got!r}"
                )

    return run_check("parse_sse", student, reference_parse_sse, test)


def reference_latency_summary(sent: float, token_times: list[float]) -> dict:
    """TTFT, TPOT (mean gap after the first token) and e2e from send time and each token's arrival time."""
    ttft = token_times[0] - sent
    e2e = token_times[-1] - sent
    tpot = (
        (token_times[-1] - token_times[0]) / (len(token_times) - 1)
        if len(token_times) > 1
        else float("nan")
    )
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e}


def check_latency_summary(student: Callable) -> Callable:
    def test(fn):
        for sent, times in [
            (10.0, [10.5, 10.6, 10.7, 10.9]),
            (0.0, [0.2, 1.2]),
            (3.0, [3.25, 3.5, 3.75, 4.0, 4.25]),
        ]:
            got, want = fn(sent, times), reference_latency_summary(sent, times)
            for key in ("ttft", "tpot", "e2e"):
                expect_close(got[key], want[key], f"{key} for tokens at {times} sent at {sent}")

    return run_check("latency_summary", student, reference_latency_summary, test)


# ---- notebook 08: quantiles from a histogram ---------------------------------------------------------


def reference_histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile: buckets are (upper bound `le`, cumulative count), sorted, last +Inf.

    Find the bucket where the rank q*total falls and interpolate linearly inside it (assuming the
    observations are spread evenly over the bucket). If it falls in the +Inf bucket, return the
    largest finite bound. The first bucket's lower bound is 0."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def check_histogram_quantile(student: Callable) -> Callable:
    inf = float("inf")
    cases: list[tuple[float, list[tuple[float, float]]]] = [
        (0.5, [(1.0, 0), (2.0, 10), (inf, 10)]),  # all in (1, 2]: the median is 1.5
        (0.95, [(10.0, 0), (30.0, 60), (inf, 60)]),  # the alert-rule test case: 29
        (0.9, [(0.1, 50), (0.5, 90), (1.0, 100), (inf, 100)]),
        (0.99, [(0.1, 10), (0.2, 10), (inf, 20)]),  # falls in +Inf: the largest finite bound
        (0.25, [(0.5, 4), (1.0, 8), (inf, 8)]),
    ]

    def test(fn):
        for q, buckets in cases:
            expect_close(
                fn(q, buckets),
                reference_histogram_quantile(q, buckets),
                f"histogram_quantile({q}, {buckets})",
            )

    return run_check("histogram_quantile", student, reference_histogram_quantile, test)


# ---- notebook 09: the cost of a token --------------------------------------------------------------------


def reference_cost_per_1k_tokens(
    price_per_hour: float, tokens_per_second: float, utilisation: float = 1.0
) -> float:
    """Dollars per 1,000 generated tokens for a machine that costs price_per_hour whether busy or not and
    produces tokens_per_second while busy, busy a fraction `utilisation` of the time."""
    if tokens_per_second <= 0 or not 0 < utilisation <= 1:
        raise ValueError(
            f"need tokens_per_second > 0 and 0 < utilisation <= 1, got {tokens_per_second}, "
            f"{utilisation}"
        )
    return price_per_hour / (tokens_per_second * 3600 * utilisation) * 1000


def check_cost_per_1k_tokens(student: Callable) -> Callable:
    def test(fn):
        for args in [
            (3.6, 1000.0, 1.0),
            (2.0, 500.0, 0.5),
            (0.09, 120.0, 0.3),
            (98.32, 20000.0, 0.7),
        ]:
            expect_close(
                fn(*args), reference_cost_per_1k_tokens(*args), f"cost_per_1k_tokens{args}"
            )

    return run_check("cost_per_1k_tokens", student, reference_cost_per_1k_tokens, test)


# ---- notebook 07: an open-loop load generator's arrival times ----------------------------------------


def check_poisson_arrivals(student: Callable) -> Callable:
    def test(fn):
        for rate in (0.5, 4.0, 50.0):
            got = fn(rate, 20_000, 1)
            if got is None or len(got) != 20_000:
                raise ExerciseFailure(
                    f"poisson_arrivals({rate}, 20000): expected 20000 times, got "
                    f"{None if got is None else len(got)}"
                )
            got = [float(t) for t in got]
            if got[0] < 0 or any(b < a for a, b in zip(got, got[1:])):
                raise ExerciseFailure(
                    "arrival times must start at or after 0 and never go back: add up the gaps "
                    "(a running sum), do not return the gaps themselves"
                )
            gaps = [b - a for a, b in zip([0.0] + got, got)]
            mean = statistics.fmean(gaps)
            if not math.isclose(mean, 1 / rate, rel_tol=0.05):
                raise ExerciseFailure(
                    f"at {rate} requests/s the mean gap should be 1/rate = {1 / rate:.4g} s, got "
                    f"{mean:.4g} s (random.expovariate takes the rate, numpy's exponential the mean)"
                )
            cv = statistics.pstdev(gaps) / mean
            if not 0.9 < cv < 1.1:
                raise ExerciseFailure(
                    f"the gaps' standard deviation should equal their mean (exponential gaps), but it is "
                    f"{cv:.2f}x the mean: evenly spaced or uniform gaps are not Poisson arrivals and hide "
                    "the bursts that make queues"
                )
        if list(fn(2.0, 50, 7)) != list(fn(2.0, 50, 7)):
            raise ExerciseFailure(
                "the same seed must give the same schedule: use random.Random(seed)"
            )

    return run_check("poisson_arrivals", student, poisson_arrivals, test)


# ---- notebook 08b: consistent hashing ------------------------------------------------------------------


def reference_ring_lookup(ring: list[tuple[int, str]], point: int) -> str:
    """The server that owns `point` on a consistent-hash ring: ring is [(point, server)] sorted by point;
    the owner is the first ring point at or after `point`, wrapping round to the first one past the end."""
    i = bisect.bisect_left([p for p, _ in ring], point)
    return ring[i % len(ring)][1]


def check_ring_lookup(student: Callable) -> Callable:
    def test(fn):
        small = [(10, "r0"), (20, "r1"), (30, "r2")]
        cases = [(5, "r0"), (10, "r0"), (11, "r1"), (20, "r1"), (29, "r2"), (30, "r2"), (31, "r0")]
        for point, want in cases:
            got = fn(small, point)
            if got != want:
                hint = (
                    " (past the last point the ring wraps round to the first)"
                    if point > 30
                    else " (a point exactly on a server's point belongs to that server)"
                    if point in (10, 20, 30)
                    else ""
                )
                raise ExerciseFailure(
                    f"ring_lookup({small}, {point}): expected {want!r}, got {got!r}{hint}"
                )
        rng = random.Random(0)
        ring = sorted((rng.getrandbits(32), f"r{i % 3}") for i in range(300))
        for _ in range(200):
            point = rng.getrandbits(32)
            expect = reference_ring_lookup(ring, point)
            if fn(ring, point) != expect:
                raise ExerciseFailure(f"on a 300-point ring, point {point}: expected {expect!r}")

    return run_check("ring_lookup", student, reference_ring_lookup, test)


# ---- notebook 08c: when may a rate-limited client come back? -------------------------------------


def reference_retry_after(level: float, per_minute: int, cost: float) -> int:
    """Retry-After (whole seconds, rounded up; at least 1) for a request needing `cost` from a token
    bucket that holds `level` now, holds at most `per_minute` and refills at per_minute / 60 per second.
    0 if it fits now. (ratelimit.TokenBucket.wait is the same sum on the server.)"""
    if cost <= level:
        return 0
    return max(1, math.ceil((cost - level) / (per_minute / 60)))


def check_retry_after(student: Callable) -> Callable:
    cases = [
        (0.0, 60, 1),  # an empty requests bucket at 60/min: one request back per second
        (0.5, 60, 1),  # half a request refilled: 0.5 s, rounded up to a whole second
        (100.0, 6000, 1100),  # 1000 tokens short at 100 tokens/s: 10 s
        (10.0, 30, 10),  # it fits now: no wait
        (2.0, 10, 5),  # 3 short at 1/6 per s: 18 s
        (0.0, 1200, 1.0),  # 0.05 s: a client cannot wait less than the 1 s the header can say
    ]

    def test(fn):
        for args in cases:
            got, want = fn(*args), reference_retry_after(*args)
            if got != want:
                raise ExerciseFailure(
                    f"retry_after(level={args[0]}, per_minute={args[1]}, cost={args[2]}): "
                    f"expected {want}, got {got!r} (refill rate = per_minute / 60 per second; "
                    f"whole seconds, rounded up, at least 1 when it has to wait)"
                )

    return run_check("retry_after", student, reference_retry_after, test)
