"""A load generator: N concurrent clients streaming completions, timed the way serving papers do.

    TTFT  time to first token: request sent -> first text chunk (queueing + prefill)
    TPOT  time per output token after the first: (e2e - TTFT) / (output tokens - 1)  (decode speed seen)
    e2e   request sent -> last chunk
    throughput  output tokens of all requests / wall time of the whole run

Each client of run_load is a closed loop (send, read the stream to the end, send the next), like
LLMPerf's benchmarks at fixed concurrency; run_open_loop sends at given times (Poisson arrivals, like
`vllm bench serve --request-rate`) whether or not the server keeps up. A request that fails, or ends without its [DONE], counts
as an error: a server that silently loses requests must not look fast.

Read in this order:

stats.py      one request's record (TTFT, TPOT, e2e), percentiles, a run's summary
client.py     a minimal keep-alive HTTP/1.1 client that times one streaming completion
runner.py     N closed-loop clients over a list of payloads, or an open loop at given send times
openloop.py   Poisson arrivals, a rate sweep past saturation, goodput under an SLO, Little's law
workloads.py  seeded, realistic payloads (the same work the offline engine can be given)
conversations.py  multi-turn chats, one session id each (load balancer affinity, notebook 08b)
plots.py      latency CDFs and throughput vs concurrency
"""

from .client import Connection, stream_completion
from .openloop import SLO, RatePoint, goodput, poisson_arrivals, rate_sweep, run_rate
from .plots import plot_latency_cdf, plot_throughput
from .runner import run_load, run_load_sync, run_open_loop
from .stats import LoadResult, RequestRecord, percentile
from .workloads import workload

__all__ = [
    "Connection",
    "LoadResult",
    "RatePoint",
    "RequestRecord",
    "SLO",
    "goodput",
    "percentile",
    "plot_latency_cdf",
    "plot_throughput",
    "poisson_arrivals",
    "rate_sweep",
    "run_load",
    "run_load_sync",
    "run_open_loop",
    "run_rate",
    "stream_completion",
    "workload",
]
