"""Per-API-key limits, the way OpenAI meters its API: requests per minute and tokens per minute.

One server, many tenants: without limits, one client that sends as fast as it can fills the batch and the
queue, and every other client's time to first token grows with it. A limit per key caps what each tenant
may take, so a noisy one is turned away at the door (429 + Retry-After, in microseconds, before the
engine sees the request) while the quiet ones keep their latency.

    {"keys": [{"key": "sk-team-a", "id": "team-a", "requests_per_minute": 60, "tokens_per_minute": 20000},
              {"key": "sk-team-b", "id": "team-b"}]}          # --api-keys FILE; team-b: the defaults

Each limit is a *token bucket* (OpenAI: "the rate limit is replenished continuously"): a bucket holds up
to `capacity` = the per-minute limit and refills at limit / 60 per second, so a key may burst up to a
minute's worth and then goes at the steady rate. A request needs 1 from the requests bucket and its
*worst-case* token cost from the tokens bucket: prompt tokens + n x max_tokens (OpenAI estimates the same
way, since the completion length is unknown until it ends). When the request ends, however it ends
(finished, failed, client gone, stream cancelled), the tokens it did not use are given back, so a short
answer is charged what it really cost. Both buckets are checked before either is taken: a request
refused for tokens does not spend a request.

A request whose worst case exceeds the whole bucket could never be admitted, however long it waited; it
gets a 400 that says which number to lower, not a 429 a client would retry forever.

Where the check runs: a client over its limit may keep sending as fast as the 429s come back (some
do, ignoring Retry-After), and every refusal costs the server CPU that the engine shares. So the
requests bucket is looked at first by a pure ASGI middleware (RequestLimitGate), from the headers alone,
before FastAPI reads or validates the body: an empty bucket is refused in tens of microseconds. The full
check needs the prompt's length, so it runs after tokenizing, right before the engine gets the request.
Even so, each refusal costs the HTTP process a few hundred microseconds of Python (benchmarks/gateway.py
measures it): a client that ignores Retry-After is best stopped before Python, at the load balancer
(balancer.py's per-key cap).

The buckets live in this process. Behind a load balancer with N replicas, each replica meters on its
own, so a key gets up to N times its limit; one exact limit for all replicas needs a shared store. The
load balancer adds a coarse one (balancer.py, key_requests_per_minute): an HAProxy stick table counts
each key's requests across all replicas and refuses those above a cap, in C, before any replica. Set
above these limits, it leaves honest clients to the exact buckets here and stops a flood at the door.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from .errors import APIError

KINDS = ("requests", "tokens")


@dataclass
class TokenBucket:
    """`level` units available now, out of `capacity`, refilled continuously at `capacity / 60` per
    second. Invariant: 0 <= level <= capacity after every call (take() refuses rather than go below 0)."""

    capacity: float
    level: float
    updated: float  # the clock reading when `level` was last brought up to date

    @classmethod
    def full(cls, per_minute: int, now: float) -> "TokenBucket":
        return cls(float(per_minute), float(per_minute), now)

    @property
    def rate(self) -> float:
        """Units per second."""
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: now; inf: never, it exceeds the capacity)."""
        self.refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        """Spend `amount`; the caller has checked wait(amount, now) == 0."""
        self.refill(now)
        assert amount <= self.level + 1e-9, (amount, self.level)
        self.level = max(0.0, self.level - amount)

    def give(self, amount: float, now: float) -> None:
        """Give back what a request did not use (never above the capacity)."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def reset_in(self, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        self.refill(now)
        return (self.capacity - self.level) / self.rate


def format_reset(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: 250ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    ms = math.ceil(seconds * 1000)  # whole milliseconds, rounded up (never "0ms" while waiting)
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    s = f"{ms / 1000:g}s"
    if hours:
        return f"{hours}h{minutes}m{s}"
    return f"{minutes}m{s}" if minutes else s


@dataclass(frozen=True)
class APIKey:
    """One tenant: its id (what logs and metrics show; never the key) and its limits (None = none)."""

    id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def limit(self, kind: str) -> int | None:
        return self.requests_per_minute if kind == "requests" else self.tokens_per_minute


def load_api_keys(path: str | Path) -> dict[str, APIKey]:
    """--api-keys FILE -> {key: APIKey}. Errors name the entry and what to fix."""
    try:
        entries = json.loads(Path(path).read_text())["keys"]
        assert isinstance(entries, list) and entries
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise ValueError(
            f'--api-keys {path}: expected a JSON file {{"keys": [{{"key": "sk-...", "id": "team-a", '
            f'"requests_per_minute": 60, "tokens_per_minute": 20000}}, ...]}} ({type(err).__name__}: {err})'
        ) from None
    keys: dict[str, APIKey] = {}
    for i, e in enumerate(entries):
        where = f"--api-keys {path}: keys[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"]:
            raise ValueError(f"{where} needs a non-empty string `key`")
        limits = [e.get("requests_per_minute"), e.get("tokens_per_minute")]
        if any(v is not None and (not isinstance(v, int) or v < 1) for v in limits):
            raise ValueError(f"{where}: limits must be integers >= 1 (or left out), got {limits}")
        key_id = e.get("id", f"key-{i}")
        if e["key"] in keys or key_id in {k.id for k in keys.values()}:
            raise ValueError(f"{where}: the key and its id must be unique")
        keys[e["key"]] = APIKey(str(key_id), *limits)
    return keys


class Grant:
    """What one admitted request took; settle() gives back the unused tokens, once."""

    def __init__(self, limiter: "RateLimiter", key: APIKey, tokens: int, headers: dict[str, str]):
        self.limiter, self.key, self.tokens, self.headers = limiter, key, tokens, headers
        self.settled = False

    def settle(self, used_tokens: int) -> None:
        if not self.settled:
            self.settled = True
            self.limiter.refund(self.key, max(0, self.tokens - used_tokens))


class RateLimiter:
    """The keys a server accepts and a pair of buckets per key id.

    keys: {key: APIKey} from --api-keys, plus the single --api-key as id "default"; no keys at all =
    an open server whose clients all share id "anonymous". Keys without limits of their own get the
    defaults; a kind with no limit anywhere is unlimited (no bucket, no header)."""

    def __init__(
        self,
        keys: dict[str, APIKey] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        default = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
        }
        self.keys = {
            key: APIKey(
                k.id,
                k.requests_per_minute or default["requests_per_minute"],
                k.tokens_per_minute or default["tokens_per_minute"],
            )
            for key, k in (keys or {}).items()
        }
        self.anonymous = None if self.keys else APIKey("anonymous", **default)
        self.clock = clock
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.limited = Counter(
            "labkit:rate_limited_requests",
            "Requests refused by a per-key limit, by key id and limit (requests, tokens, too_large)",
            ["key_id", "limit"],
            registry=registry or CollectorRegistry(),
        )

    def authenticate(self, authorization: str) -> APIKey:
        """The key behind an `Authorization` header, or 401."""
        if self.anonymous is not None:
            return self.anonymous
        key = self.keys.get(authorization.removeprefix("Bearer "))
        if key is None or not authorization.startswith("Bearer "):
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )
        return key

    def bucket(self, key: APIKey, kind: str) -> TokenBucket | None:
        limit = key.limit(kind)
        if limit is None:
            return None
        if (key.id, kind) not in self.buckets:
            self.buckets[key.id, kind] = TokenBucket.full(limit, self.clock())
        return self.buckets[key.id, kind]

    def admit(self, key: APIKey, tokens: int, take: bool = True) -> Grant:
        """Take 1 request and `tokens` (the worst case) from the key's buckets, or raise 429 (or 400 if
        `tokens` can never fit). Returns the grant whose headers go on the response."""
        now, cost = self.clock(), {"requests": 1, "tokens": tokens}
        tokens_bucket = self.bucket(key, "tokens")
        if tokens_bucket is not None and tokens > tokens_bucket.capacity:
            self.limited.labels(key.id, "too_large").inc()
            raise APIError(
                400,
                f"Request too large for key {key.id} on tokens per minute (TPM): Limit "
                f"{tokens_bucket.capacity:.0f}, Requested {tokens} (prompt + n x max_tokens). It can "
                f"never fit: lower max_tokens (or n, or the prompt), or ask for a higher limit.",
                param="max_tokens",
                code="request_too_large",
            )
        waits = {
            kind: b.wait(cost[kind], now)
            for kind in KINDS
            if (b := self.bucket(key, kind)) is not None
        }
        blocked = [kind for kind, wait in waits.items() if wait > 0]
        if blocked:
            kind = max(blocked, key=lambda k: waits[k])
            bucket = self.buckets[key.id, kind]
            self.limited.labels(key.id, kind).inc()
            retry = max(1, math.ceil(waits[kind]))
            raise APIError(
                429,
                f"Rate limit reached for key {key.id} on {kind} per minute: Limit "
                f"{bucket.capacity:.0f}, Used {bucket.capacity - bucket.level:.0f}, Requested "
                f"{cost[kind]}. Please try again in {format_reset(waits[kind])}.",
                type=kind,
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry), **self.headers(key, now)},
            )
        if take:
            for kind in waits:
                self.buckets[key.id, kind].take(cost[kind], now)
        return Grant(self, key, tokens, self.headers(key, now))

    def refund(self, key: APIKey, tokens: int) -> None:
        bucket = self.bucket(key, "tokens")
        if bucket is not None and tokens > 0:
            bucket.give(tokens, self.clock())

    def headers(self, key: APIKey, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the key's limits."""
        out = {}
        for kind in KINDS:
            bucket = self.bucket(key, kind)
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = f"{bucket.capacity:.0f}"
                out[f"x-ratelimit-remaining-{kind}"] = str(math.floor(bucket.level + 1e-9))
                out[f"x-ratelimit-reset-{kind}"] = format_reset(bucket.reset_in(now))
        return out


class RequestLimitGate:
    """Pure ASGI middleware in front of the generation routes: a known key with no request left gets
    its 429 from the headers alone, before the body is read. (Unknown keys go on to the routes' 401.)"""

    def __init__(self, app, limiter: RateLimiter, paths: set[str]):
        self.app, self.limiter, self.paths = app, limiter, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.paths:
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            try:
                key = self.limiter.authenticate(authorization.decode("latin-1"))
                self.limiter.admit(key, 0, take=False)
            except APIError as err:
                if err.status == 429:
                    exchange = scope.get("state", {}).get("exchange")  # accesslog.py's record
                    if exchange is not None:
                        exchange.key_id = key.id
                    return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)
