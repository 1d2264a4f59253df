"""Plots of load-test results (notebook 07)."""

import matplotlib.pyplot as plt

from .stats import LoadResult


def plot_latency_cdf(results: list[LoadResult], metric: str = "ttft", ax=None):
    """Empirical CDF of TTFT / TPOT / e2e, one line per concurrency level."""
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
                label=f"{res.concurrency} client{'' if res.concurrency == 1 else 's'}",
            )
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{metric.upper()} CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_throughput(summaries: list[dict], offline_tok_s: float | None = None, ax=None):
    """Output tokens/s vs number of concurrent clients (and the offline engine's, as a line)."""
    ax = ax or plt.gca()
    xs = [s["concurrency"] for s in summaries]
    ax.plot(
        xs, [s["throughput_tok_s"] for s in summaries], "o-", label="server (streaming clients)"
    )
    if offline_tok_s:
        ax.axhline(offline_tok_s, color="gray", ls="--", label="offline engine, same workload")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])  # the levels run (1, 4, 16), not powers of two
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
