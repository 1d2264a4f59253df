"""What a load test measures: one record per request, and percentiles over a run.

TTFT  time to first token: request sent -> first text chunk (queueing + prefill)
TPOT  time per output token after the first: (e2e - TTFT) / (output tokens - 1)  (decode speed seen)
e2e   request sent -> last chunk
throughput  output tokens of all requests / wall time of the whole run
"""

import statistics
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
    status: int | None = None  # the HTTP status (None: no response at all)
    retry_after: str | None = None  # the Retry-After header of a 429 or 503

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
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
            # of the errors: refused at the door (the server's queue is full), with a Retry-After or not
            "rejected_429": sum(1 for r in self.records if r.status == 429),
            "rejected_429_with_retry_after": sum(
                1 for r in self.records if r.status == 429 and r.retry_after
            ),
            "server_errors_5xx": sum(1 for r in self.records if r.status and r.status >= 500),
            "disconnected": sum(1 for r in self.records if r.disconnected),
            "output_tokens": out,
            "wall_s": self.wall,
            "throughput_tok_s": out / self.wall if self.wall else 0.0,
            "requests_per_s": len(ok) / self.wall if self.wall else 0.0,
        }
        for name, values in (
            ("ttft", [r.ttft for r in ok if r.ttft is not None]),
            ("tpot", [r.tpot for r in ok if r.tpot is not None]),
            ("e2e", [r.e2e for r in ok if r.e2e is not None]),
        ):
            for q in (50, 95, 99):
                s[f"{name}_p{q}_s"] = percentile(values, q)
            s[f"{name}_mean_s"] = statistics.fmean(values) if values else float("nan")
        return s
