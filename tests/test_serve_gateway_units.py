"""The gateway's pieces without a server: token-bucket maths on an injected clock (no sleeps), the
limiter's 429s and headers, the keys file, the response cache's key and bounds, the access log's
middleware on a bare ASGI app."""

import asyncio
import json
import math

import pytest
from prometheus_client import CollectorRegistry

from labkit.serve.accesslog import AccessLog, AccessLogMiddleware
from labkit.serve.checks import reference_retry_after
from labkit.serve.errors import APIError
from labkit.serve.protocol import ChatCompletionRequest, CompletionRequest
from labkit.serve.ratelimit import (
    APIKey,
    RateLimiter,
    RequestLimitGate,
    TokenBucket,
    format_reset,
    load_api_keys,
)
from labkit.serve.response_cache import ResponseCache, cache_key


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rpm=None, tpm=None, keys=None) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(keys, rpm, tpm, CollectorRegistry(), clock=clock), clock


# ---- the bucket ------------------------------------------------------------------------------------


def test_bucket_refills_continuously_at_limit_over_60_and_never_past_capacity():
    b = TokenBucket.full(60, now=0.0)  # 1 per second
    b.take(60, now=0.0)
    assert b.wait(1, now=0.0) == pytest.approx(1.0)
    assert b.wait(1, now=0.25) == pytest.approx(0.75)
    b.refill(now=30.0)
    assert b.level == pytest.approx(30.0)
    b.refill(now=1000.0)
    assert b.level == 60.0  # capped
    assert b.wait(61, now=1000.0) == math.inf  # more than a minute's worth: never
    b.take(10, now=1000.0)
    b.give(25, now=1000.0)  # a refund never overfills
    assert b.level == 60.0
    assert b.reset_in(now=1000.0) == 0.0


def test_format_reset_is_openais_duration_format():
    assert [format_reset(s) for s in (0.25, 0.0004, 1, 1.5, 59.9996, 360, 90.5, 3723)] == [
        "250ms",
        "1ms",
        "1s",
        "1.5s",
        "1m0s",
        "6m0s",
        "1m30.5s",
        "1h2m3s",
    ]


# ---- the limiter ----------------------------------------------------------------------------------


def test_no_limits_means_unlimited_and_no_headers():
    rl, _ = limiter()
    key = rl.authenticate("")
    assert key.id == "anonymous"
    for _ in range(10_000):
        assert rl.admit(key, 10**6).headers == {}


def test_requests_limit_counts_down_then_429_with_retry_after_and_refills():
    rl, clock = limiter(rpm=3)
    key = rl.authenticate("")
    remaining = [int(rl.admit(key, 5).headers["x-ratelimit-remaining-requests"]) for _ in range(3)]
    assert remaining == [2, 1, 0]
    with pytest.raises(APIError) as err:
        rl.admit(key, 5)
    e = err.value
    assert e.status == 429 and e.type == "requests" and e.code == "rate_limit_exceeded"
    assert e.headers["Retry-After"] == "20"  # 1 request at 3/min = 20 s
    assert "Limit 3, Used 3, Requested 1" in e.message and "try again in 20s" in e.message
    assert e.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 20
    assert rl.admit(key, 5).headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_are_charged_worst_case_and_refunded_to_what_was_used():
    rl, clock = limiter(tpm=600)  # 10 tokens/s
    key = rl.authenticate("")
    grant = rl.admit(key, 500)  # prompt 20 + max_tokens 480
    assert grant.headers["x-ratelimit-remaining-tokens"] == "100"
    with pytest.raises(APIError) as err:
        rl.admit(key, 300)  # 200 short at 10/s
    assert err.value.type == "tokens" and err.value.headers["Retry-After"] == "20"
    grant.settle(20 + 30)  # it stopped after 30 tokens: 450 come back
    grant.settle(0)  # once only
    assert rl.buckets["anonymous", "tokens"].level == pytest.approx(550)
    rl.admit(key, 300)  # now it fits, without waiting
    assert clock.now == 1000.0


def test_a_request_refused_for_tokens_does_not_spend_a_request():
    rl, _ = limiter(rpm=2, tpm=100)
    key = rl.authenticate("")
    rl.admit(key, 90)
    with pytest.raises(APIError):
        rl.admit(key, 50)
    assert rl.buckets["anonymous", "requests"].level == pytest.approx(1)


def test_a_request_that_can_never_fit_gets_a_400_that_says_what_to_lower():
    rl, _ = limiter(tpm=100)
    key = rl.authenticate("")
    with pytest.raises(APIError) as err:
        rl.admit(key, 101)
    e = err.value
    assert e.status == 400 and e.code == "request_too_large" and e.param == "max_tokens"
    assert "never fit" in e.message and "lower max_tokens" in e.message
    assert rl.buckets["anonymous", "tokens"].level == 100  # nothing taken


def test_retry_after_matches_the_exercise_reference():
    for level, per_minute, cost in [(0.0, 60, 1), (100.0, 6000, 1100), (2.0, 10, 5), (0, 1200, 1)]:
        rl, _ = limiter(tpm=per_minute)
        rl.buckets["anonymous", "tokens"] = TokenBucket(per_minute, level, 1000.0)
        with pytest.raises(APIError) as err:
            rl.admit(rl.authenticate(""), int(cost))
        assert int(err.value.headers["Retry-After"]) == reference_retry_after(
            level, per_minute, cost
        )


def test_keys_file_defaults_and_auth(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": "sk-a", "id": "team-a", "requests_per_minute": 5},
                    {"key": "sk-b", "id": "team-b"},
                ]
            }
        )
    )
    keys = load_api_keys(path)
    rl, _ = limiter(rpm=100, tpm=1000, keys={**keys, "single": APIKey("default")})
    assert rl.authenticate("Bearer sk-a") == APIKey("team-a", 5, 1000)
    assert rl.authenticate("Bearer sk-b") == APIKey("team-b", 100, 1000)
    assert rl.authenticate("Bearer single").id == "default"
    for bad in ("", "sk-a", "Bearer sk-c", "Bearer "):
        with pytest.raises(APIError) as err:
            rl.authenticate(bad)
        assert err.value.status == 401
    for text, message in [
        ("{}", "expected a JSON file"),
        ('{"keys": [{"id": "x"}]}', "non-empty string `key`"),
        ('{"keys": [{"key": "a", "requests_per_minute": 0}]}', "integers >= 1"),
        ('{"keys": [{"key": "a", "id": "x"}, {"key": "b", "id": "x"}]}', "unique"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_api_keys(path)


def test_rate_limited_requests_are_counted_per_key_and_kind():
    rl, _ = limiter(rpm=1)
    key = rl.authenticate("")
    rl.admit(key, 1)
    for _ in range(3):
        with pytest.raises(APIError):
            rl.admit(key, 1)
    assert rl.limited.labels("anonymous", "requests")._value.get() == 3


# ---- the response cache ---------------------------------------------------------------------------


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "It is", "temperature": 0, **kw})


def test_cache_key_ignores_what_cannot_change_a_greedy_answer():
    base = cache_key("/v1/completions", "course", completion(), 16)
    assert base is not None
    for same in ({"seed": 3}, {"user": "bob"}, {"top_p": 0.5, "top_k": 3}, {"model": "course"}):
        assert cache_key("/v1/completions", "course", completion(**same), 16) == base, same
    for different in (
        {"n": 2},
        {"logprobs": 1},
        {"stop": ["\n"]},
        {"echo": True},
        {"stop_token_ids": [5]},
        {"ignore_eos": True},
        {"prompt": "It was"},
    ):
        assert cache_key("/v1/completions", "course", completion(**different), 16) != base
    assert cache_key("/v1/completions", "course", completion(), 17) != base
    assert cache_key("/v1/completions", "other", completion(), 16) != base
    assert cache_key("/v1/chat/completions", "course", completion(), 16) != base


def test_sampled_and_streamed_requests_are_never_cacheable():
    assert cache_key("/v1/completions", "course", completion(temperature=0.7), 16) is None
    assert cache_key("/v1/completions", "course", completion(temperature=0.7, seed=1), 16) is None
    assert cache_key("/v1/completions", "course", completion(stream=True), 16) is None
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "seed": 1}
    )
    assert cache_key("/v1/chat/completions", "course", chat, 16) is None  # default temperature 1


def test_chat_key_ignores_a_message_name():
    def chat(**m):
        return ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi", **m}], "temperature": 0}
        )

    assert cache_key("c", "m", chat(name="ann"), 8) == cache_key("c", "m", chat(), 8)


def body(i: int, size: int = 10) -> dict:
    return {"choices": [{"text": "x" * size}], "usage": {"completion_tokens": i}}


def test_cache_is_lru_within_its_entry_bound():
    cache = ResponseCache(2, 10**6, CollectorRegistry())
    cache.put("a", body(1))
    cache.put("b", body(2))
    assert cache.get("a") == body(1)  # a is now the most recent
    cache.put("c", body(3))  # evicts b
    assert cache.get("b") is None and cache.get("a") == body(1) and cache.get("c") == body(3)
    assert len(cache.entries) == 2
    assert (cache.hits._value.get(), cache.misses._value.get(), cache.evictions._value.get()) == (
        3,
        1,
        1,
    )
    assert cache.entries_gauge._value.get() == 2


def test_cache_stays_within_its_byte_bound():
    size = len(json.dumps(body(0, 100)))
    cache = ResponseCache(100, 3 * size, CollectorRegistry())
    for i in range(10):
        cache.put(str(i), body(i, 100))
        assert cache.bytes <= 3 * size
    assert list(cache.entries) == ["7", "8", "9"]
    assert cache.bytes_gauge._value.get() == cache.bytes == 3 * size
    cache.put("huge", body(0, 10 * size))  # larger than the whole cache: not kept, nothing evicted
    assert "huge" not in cache.entries and len(cache.entries) == 3


# ---- the access log middleware on a bare ASGI app ------------------------------------------------


def call(app, headers=(), disconnect=False) -> tuple[list[dict], list]:
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": list(headers)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"} if disconnect else {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, scope


def test_access_log_writes_one_json_line_and_echoes_a_sane_request_id(tmp_path):
    async def inner(scope, receive, send):
        ex = scope["state"]["exchange"]
        ex.key_id, ex.prompt_tokens, ex.prompt = "team-a", 3, "secret prompt"
        ex.headers["x-ratelimit-remaining-requests"] = "4"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    path = tmp_path / "access.log"
    for with_text in (False, True):
        log = AccessLog(str(path), with_text, CollectorRegistry())
        sent, _ = call(AccessLogMiddleware(inner, log), [(b"x-request-id", b"client-42")])
        headers = dict(sent[0]["headers"])
        assert headers[b"x-request-id"] == b"client-42"
        assert headers[b"x-ratelimit-remaining-requests"] == b"4"
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["request_id"] == "client-42" and first["key_id"] == "team-a"
    assert first["status"] == 200 and first["prompt_tokens"] == 3 and first["ttft_s"] >= 0
    assert "prompt" not in first and "secret prompt" not in path.read_text().splitlines()[0]
    assert second["prompt"] == "secret prompt"

    sent, _ = call(AccessLogMiddleware(inner, log), [(b"x-request-id", b"bad id\n" * 50)])
    generated = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert generated != "bad id" and len(generated) == 32


def test_a_log_that_cannot_be_written_never_fails_the_request(tmp_path):
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    log = AccessLog(str(tmp_path / "a.log"), False, CollectorRegistry())
    assert log.stream is not None
    log.stream.close()  # as a closed stdout or a full disk would
    sent, _ = call(AccessLogMiddleware(inner, log))
    assert sent[-1]["body"] == b"ok"
    assert log.dropped._value.get() == 1


def test_access_log_records_errors_disconnects_and_runs_clean_ups(tmp_path):
    ended = []

    async def inner(scope, receive, send):
        scope["state"]["exchange"].on_end.append(ended.append)
        await receive()  # the client is gone
        await send({"type": "http.response.start", "status": 429, "headers": []})
        error = {"error": {"message": "m", "type": "requests", "code": "rate_limit_exceeded"}}
        await send({"type": "http.response.body", "body": json.dumps(error).encode()})

    path = tmp_path / "a.log"
    call(
        AccessLogMiddleware(inner, AccessLog(str(path), False, CollectorRegistry())),
        disconnect=True,
    )
    line = json.loads(path.read_text())
    assert line["status"] == 429 and line["error"] == "rate_limit_exceeded"
    assert line["disconnected"] is True and len(ended) == 1


def test_the_gate_refuses_an_empty_requests_bucket_from_the_headers_alone():
    rl, _ = limiter(keys={"sk-a": APIKey("a", requests_per_minute=1)})
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = RequestLimitGate(inner, rl, {"/x"})
    key = [(b"authorization", b"Bearer sk-a")]
    rl.admit(rl.authenticate("Bearer sk-a"), 1)  # the only request of the minute
    sent, _ = call(gate, key)
    assert sent[0]["status"] == 429 and reached == []
    assert dict(sent[0]["headers"])[b"retry-after"] == b"60"
    call(gate, [(b"authorization", b"Bearer sk-unknown")])  # the route answers 401
    assert reached == ["/x"]


def test_cli_refuses_bad_gateway_flags_before_loading_anything(tmp_path):
    from labkit.serve.cli import main

    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"key": ""}]}')
    with pytest.raises(SystemExit, match="non-empty string `key`"):
        main(["--api-keys", str(bad)])
    with pytest.raises(SystemExit, match="tokens-per-minute"):
        main(["--tokens-per-minute", "0"])
    with pytest.raises(SystemExit, match="response-cache"):
        main(["--response-cache", "-1"])
    with pytest.raises(SystemExit, match="gateway flags"):
        main(["--backend", "vllm", "--response-cache", "8"])
