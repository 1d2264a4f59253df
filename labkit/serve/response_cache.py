"""A response cache for deterministic requests: the same greedy request twice costs the engine once.

Some traffic repeats exactly: a health probe that asks a fixed question, a batch job re-run after a
crash, an evaluation that scores the same prompts each night. With temperature 0 the answer is a
function of the request, so the server can keep it and answer the second time without a prefill or a
decode step. It only pays for *identical* deterministic requests: a different prompt, a sampled
request, or one more token of max_tokens is a miss (the prefix cache, notebook 04, is what saves work
on shared prefixes).

What is cached: non-streaming /v1/completions and /v1/chat/completions with temperature 0 that
finished without an error. Streams are left out: a cached stream would have to be replayed as chunks
with made-up timings, and a client streams because it wants tokens as they are made, which a cache
cannot improve on much. Sampled requests (temperature > 0) are never cached, with or without `seed`:
the engine's seeded sampling is reproducible on one machine, but a seed is a request for *a* sample
and the next one may be meant to differ.

The key is a SHA-256 of the endpoint, the model name and the validated request with the fields that
cannot change a greedy answer left out: `seed`, `top_p`, `top_k` (greedy takes the argmax whatever
they are; logprobs are computed before them), `user` (a label for the client's bookkeeping), `stream`
and `stream_options`, and a chat message's `name` (the chat template here ignores it). `max_tokens` is
replaced by the value the server resolved (absent = 16 on completions). What stays in: the prompt or
messages, n, max_tokens, stop, stop_token_ids, ignore_eos, echo, logprobs, top_logprobs.

Bounded twice, least recently used out first: `max_entries` and `max_bytes` (the JSON size of the
cached choices and usage). A hit gets a fresh response id and `created` time with the cached choices
and usage. Concurrent identical misses each run (no request coalescing).

Rate limits (ratelimit.py) see a hit like any request: it counts against the key's request limit and is
charged its tokens (the cached usage's prompt + completion), because a quota measures what a tenant
receives, not what the server spent on it.
"""

import hashlib
import json
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

# fields of the request models that cannot change a temperature-0 answer (see the docstring)
IGNORED = {"model", "seed", "top_p", "top_k", "user", "stream", "stream_options"}


def cache_key(endpoint: str, model: str, req: BaseModel, max_tokens: int) -> str | None:
    """The key of a cacheable request, or None if it must not be cached (sampled, or a stream)."""
    if getattr(req, "temperature", 1.0) != 0 or getattr(req, "stream", False):
        return None
    exclude: dict = dict.fromkeys(IGNORED | {"max_tokens", "max_completion_tokens"}, True)
    if "messages" in type(req).model_fields:
        exclude["messages"] = {"__all__": {"name"}}
    fields = req.model_dump(exclude=exclude)
    canonical = json.dumps([endpoint, model, max_tokens, fields], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """key -> {"choices": [...], "usage": {...}}, LRU, at most max_entries and max_bytes."""

    def __init__(self, max_entries: int, max_bytes: int, registry: CollectorRegistry):
        if max_entries < 0 or max_bytes < 1:
            raise ValueError("the response cache needs max_entries >= 0 and max_bytes >= 1")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[str, tuple[dict, int]] = OrderedDict()  # key -> (body, size)
        self.bytes = 0

        def counter(name, doc):
            return Counter(f"labkit:response_cache_{name}", doc, registry=registry)

        self.hits = counter("hits", "Cacheable requests answered from the response cache")
        self.misses = counter(
            "misses", "Cacheable (temperature-0, non-streaming) requests not found"
        )
        self.evictions = counter("evictions", "Entries dropped to stay within the bounds")
        self.entries_gauge = Gauge(
            "labkit:response_cache_entries", "Cached responses", registry=registry
        )
        self.bytes_gauge = Gauge(
            "labkit:response_cache_bytes", "JSON bytes of the cached responses", registry=registry
        )

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, key: str) -> dict | None:
        found = self.entries.get(key)
        if found is None:
            self.misses.inc()
            return None
        self.entries.move_to_end(key)
        self.hits.inc()
        return found[0]

    def put(self, key: str, body: dict) -> None:
        """Keep {"choices", "usage"}; a body larger than max_bytes on its own is not kept."""
        size = len(json.dumps(body))
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]
        self.entries[key] = (body, size)
        self.bytes += size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][1]
            self.evictions.inc()
        self.entries_gauge.set(len(self.entries))
        self.bytes_gauge.set(self.bytes)
