"""Prometheus metrics under vLLM's names, so vLLM's Grafana dashboard and alert rules work unchanged.

Latency histograms are observed the moment a step's tokens reach the HTTP process (with the engine in
its own process; with --engine-mode thread, when they leave `engine.step()`), not when the HTTP layer
gets round to sending them; gauges are refreshed after every step. Each app gets its
own registry, so several servers (or tests) can live in one process.
"""

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so the dashboard's quantiles mean the same thing
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
HTTP_HANDLERS = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/generate",
    "/health",
    "/ready",
    "/metrics",
}


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        m = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, m, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100%")
        self.kv_usage_old = gauge(
            "vllm:gpu_cache_usage_perc", "KV-cache usage, 1 = 100% (vLLM's pre-0.10 name)"
        )
        self.prefix_hit_rate = gauge(
            "vllm:gpu_prefix_cache_hit_rate", "Prefix-cache block hit rate since the engine started"
        )
        # vLLM v1's counters: a hit rate over any window is rate(hits) / rate(queries)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (whole blocks)",
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (whole blocks)"
        )
        self.kv_blocks_used = gauge(
            "labkit:kv_blocks_used", "KV blocks held by sequences (0 when idle)"
        )
        self.kv_blocks_total = gauge("labkit:kv_blocks_total", "KV blocks in the pool")
        self.active = gauge(
            "labkit:active_requests", "Requests the server holds (queued, running, streaming)"
        )
        self.steps = counter(
            "labkit:engine_steps", "engine.step() calls (tokens per step = batch size at work)"
        )
        self.step_seconds = counter("labkit:engine_step_seconds", "Wall time inside engine.step()")
        self.step_cpu_seconds = counter(
            "labkit:engine_step_cpu_seconds",
            "CPU time of the engine's thread inside step(); the gap to wall time is "
            "time spent waiting for a core (or, with --engine-mode thread, the GIL)",
        )
        self.preemptions = counter(
            "vllm:num_preemptions", "Preemptions (sequences evicted and recomputed)"
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens")
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Time per output token of each request",
            TPOT_BUCKETS,
        )
        self.tpot_old = hist(
            "vllm:time_per_output_token_seconds",
            "Time per output token (older vLLM's name; vLLM 0.32 no longer exports it)",
            TPOT_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Inter-token latency (vLLM >= 0.11 name)",
            TPOT_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency", E2E_BUCKETS
        )
        self.req_prompt = hist(
            "vllm:request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.req_gen = hist(
            "vllm:request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS
        )
        self.success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason",
            m + ["finished_reason"],
            registry=r,
        )
        self.model_name = model_name
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests by handler and status class",
            ["handler", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            ["handler", "method"],
            registry=r,
        )
        # per LoRA adapter (vLLM labels its LoRA metrics by adapter too); lora_name "" is the base model
        self.lora_requests = Counter(
            "labkit:lora_requests", "Requests by LoRA adapter", m + ["lora_name"], registry=r
        )
        self.lora_generation_tokens = Counter(
            "labkit:lora_generation_tokens",
            "Generated tokens by LoRA adapter",
            m + ["lora_name"],
            registry=r,
        )
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # the engine's (queries, hits) at the last update

    def update_engine_stats(self, stats, active: int) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_usage_old.set(stats.kv_usage)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.active.set(active)
        if stats.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if queries < self._prefix_seen[0]:  # a restarted engine counts from 0 again
            self._prefix_seen = (0, 0)
        self.prefix_queries.inc(queries - self._prefix_seen[0])
        self.prefix_hits.inc(hits - self._prefix_seen[1])
        self._prefix_seen = (queries, hits)

    def engine_step(self, wall: float, cpu: float) -> None:
        self.steps.inc()
        self.step_seconds.inc(wall)
        self.step_cpu_seconds.inc(cpu)

    def finished(self, reason: str, e2e: float, n_prompt: int, n_out: int) -> None:
        self.success.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e)
        self.req_prompt.observe(n_prompt)
        self.req_gen.observe(n_out)

    def lora_request(self, exchange) -> None:
        """Count a request that reached the engine under its adapter, and its tokens once it ends."""
        labels = (self.model_name, exchange.lora or "")
        self.lora_requests.labels(*labels).inc()
        tokens = self.lora_generation_tokens.labels(*labels)
        exchange.on_end.append(lambda ex: tokens.inc(ex.completion_tokens or 0))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HTTPMetricsMiddleware:
    """Pure ASGI middleware (it does not buffer streams): counts requests by handler and status class,
    the way prometheus-fastapi-instrumentator (used by vLLM) labels them."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            handler = scope["path"] if scope["path"] in HTTP_HANDLERS else "other"
            self.metrics.http_requests.labels(
                handler, scope["method"], f"{status[0] // 100}xx"
            ).inc()
            self.metrics.http_latency.labels(handler, scope["method"]).observe(
                time.perf_counter() - start
            )


# ---- reading /metrics back (notebook 08, benchmarks, tests) ------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {series name: value}, summed over label sets except `le` buckets,
    which are kept as 'name{le}' keys. Enough for one model per server."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = f"{s.name}{{{s.labels['le']}}}" if "le" in s.labels else s.name
            values[key] = values.get(key, 0.0) + s.value
    return values


def histogram_buckets(values: dict[str, float], name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count), ...] sorted, ending with +Inf, from parse_metrics output."""
    prefix = name + "_bucket{"
    return sorted(
        (float(k[len(prefix) : -1]), v) for k, v in values.items() if k.startswith(prefix)
    )
