"""The gateway features of `labkit serve` on a real server process: per-key limits (429, Retry-After,
OpenAI's x-ratelimit-* headers, refunds), the JSON access log, request ids, and the response cache.

Limits are chosen so that outcomes do not depend on timing: a bucket of 300 tokens/min refills 5 per
second, so a second request that fits only thanks to the first one's refund proves the refund."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from labkit.serve.launch import ServerProcess
from labkit.serve.loadgen import run_load
from labkit.serve.metrics import parse_metrics

PROMPT = "It is a truth universally acknowledged"
SHORT = {"prompt": "It is a truth", "max_tokens": 200, "stop": [" am"]}  # greedy: " which I am"
KEYS = [
    {"key": "sk-tiny", "id": "tiny", "requests_per_minute": 2},
    {"key": "sk-tokens", "id": "tokens", "tokens_per_minute": 300},
    {"key": "sk-six", "id": "six", "requests_per_minute": 6},  # one back every 10 s
    {"key": "sk-free", "id": "free"},  # the defaults: --requests-per-minute / --tokens-per-minute
]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway")
    (d / "keys.json").write_text(json.dumps({"keys": KEYS}))
    with ServerProcess(
        max_num_seqs=4,
        threads=1,
        api_keys=d / "keys.json",
        requests_per_minute=1000,
        access_log=d / "access.log",
        response_cache=2,
    ) as srv:
        srv.access_log = d / "access.log"
        yield srv


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """No keys (everyone is "anonymous", with a default token limit), prompts and completions in the
    log, and a queue of one behind a batch of one, so that a burst is refused with queue_full."""
    path = tmp_path_factory.mktemp("open") / "access.log"
    with ServerProcess(
        max_num_seqs=1,
        max_waiting=1,
        threads=1,
        tokens_per_minute=1000,
        access_log=path,
        access_log_text=True,
    ) as srv:
        srv.access_log = path
        yield srv


def log_line(srv, request_id: str, timeout: float = 10.0) -> dict:
    """The access-log line of a request (written just after its response ends)."""
    deadline = time.time() + timeout
    while True:
        for line in srv.access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        assert time.time() < deadline, f"no log line for {request_id}"
        time.sleep(0.05)


def post(srv, key: str, request_id: str | None = None, **body) -> httpx.Response:
    headers = (bearer(key) if key else {}) | ({"X-Request-Id": request_id} if request_id else {})
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=120)


def metrics(srv) -> dict[str, float]:
    return parse_metrics(httpx.get(srv.url + "/metrics").text)


def test_a_key_over_its_request_limit_gets_429_with_retry_after_and_never_reaches_the_engine(
    server,
):
    ok = [post(server, "sk-tiny", max_tokens=4) for _ in range(2)]  # the second is a cache hit
    assert [r.status_code for r in ok] == [200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["1", "0"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
    assert "x-ratelimit-limit-tokens" not in ok[0].headers  # the key has no token limit
    before = metrics(server)
    refused = post(server, "sk-tiny", request_id="refused-1", max_tokens=4)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "Limit 2" in error["message"] and "try again in" in error["message"]
    after = metrics(server)
    assert after["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"]
    assert after["labkit:rate_limited_requests_total"] == 1 + before.get(
        "labkit:rate_limited_requests_total", 0
    )
    line = log_line(server, "refused-1")
    assert line["status"] == 429 and line["key_id"] == "tiny"
    assert line["error"] == "rate_limit_exceeded"


def test_remaining_counts_decrease_and_keys_are_checked(server):
    replies = [post(server, "sk-six", max_tokens=2) for _ in range(3)]  # cache hits count too
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in replies]
    assert remaining[0] > remaining[1] > remaining[2]
    assert post(server, "sk-nope").status_code == 401
    assert post(server, "").status_code == 401


def test_unused_tokens_are_refunded_after_a_short_completion(server):
    """Each request costs prompt + 200 of a 300 bucket: the second fits only if the first, which stops
    after a few tokens, gave back what it did not use."""
    first = post(server, "sk-tokens", request_id="refund-1", **SHORT)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] < 20
    charged = 300 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert charged >= 200  # charged the worst case at admission
    second = post(server, "sk-tokens", **SHORT)
    assert second.status_code == 200, second.text
    assert log_line(server, "refund-1")["key_id"] == "tokens"


def test_a_cancelled_stream_is_refunded_and_logged_as_disconnected(server):
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = bearer("sk-tokens") | {"X-Request-Id": "hang-up-1"}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "hang-up-1"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    line = log_line(server, "hang-up-1")
    assert line["disconnected"] is True and line["completion_tokens"] < 200
    # the stream was charged prompt + 200 of 300; only a refund lets the next such request in
    again = post(server, "sk-tokens", **SHORT)
    assert again.status_code == 200, again.text


def test_a_request_that_can_never_fit_is_told_what_to_lower(server):
    r = post(server, "sk-tokens", max_tokens=400)  # within the context, beyond the key's 300
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "lower max_tokens" in error["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-tokens", max_retries=0)
    with pytest.raises(openai.BadRequestError):  # not a RateLimitError a client would retry
        client.completions.create(model="course", prompt=PROMPT, max_tokens=400)


def test_the_openai_client_sees_the_headers_and_raises_rate_limit_error(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-free", max_retries=0)
    raw = client.completions.with_raw_response.create(
        model="course", prompt=PROMPT, max_tokens=4, temperature=0
    )
    assert int(raw.headers["x-ratelimit-limit-requests"]) == 1000
    assert raw.parse().choices[0].text
    tiny = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-tiny", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        tiny.completions.create(model="course", prompt=PROMPT, max_tokens=4)
    assert err.value.response.headers["retry-after"]


def test_request_ids_round_trip_and_generated_ones_are_unique(server):
    r = post(server, "sk-free", request_id="trace-abc.123", seed=99)
    assert r.headers["x-request-id"] == "trace-abc.123"
    generated = {post(server, "sk-free", seed=i).headers["x-request-id"] for i in range(2)}
    insane = post(server, "sk-free", request_id="a b", seed=7).headers["x-request-id"]
    assert len(generated) == 2 and insane != "a b"
    line = log_line(server, "trace-abc.123")
    assert line["key_id"] == "free" and line["prompt_tokens"] > 0 and line["completion_tokens"] == 8
    assert line["ttft_s"] <= line["duration_s"]
    text = server.access_log.read_text()
    assert PROMPT not in text and "sk-free" not in text  # no text, no keys by default


def test_a_cache_hit_returns_exactly_the_choices_of_the_miss_that_filled_it(server):
    body = {"max_tokens": 12, "logprobs": 2, "stop": ["\n"], "seed": 1, "user": "a"}
    before = metrics(server)
    miss = post(server, "sk-free", request_id="cache-miss", **body).json()
    hit = post(server, "sk-free", request_id="cache-hit", **{**body, "seed": 2, "user": "b"}).json()
    assert hit["choices"] == miss["choices"] and hit["usage"] == miss["usage"]
    assert hit["id"] != miss["id"]
    after = metrics(server)
    assert (
        after["labkit:response_cache_hits_total"] == before["labkit:response_cache_hits_total"] + 1
    )
    assert log_line(server, "cache-hit")["cached"] is True
    assert log_line(server, "cache-miss")["cached"] is False
    chat = {"messages": [{"role": "user", "content": "Will you dance?"}], "max_tokens": 8}
    chats = [
        httpx.post(
            server.url + "/v1/chat/completions",
            json={**chat, "temperature": 0},
            headers=bearer("sk-free"),
            timeout=60,
        ).json()
        for _ in range(2)
    ]
    assert chats[0]["choices"] == chats[1]["choices"]
    assert (
        metrics(server)["labkit:response_cache_hits_total"]
        == after["labkit:response_cache_hits_total"] + 1
    )


def test_sampled_requests_never_hit_the_cache(server):
    before = metrics(server)
    for body in ({"temperature": 0.8}, {"temperature": 0.8, "seed": 5}):
        for _ in range(2):
            assert post(server, "sk-free", **body).status_code == 200
    streamed = {"temperature": 0, "stream": True}
    for _ in range(2):
        assert post(server, "sk-free", **streamed).status_code == 200
    after = metrics(server)
    for name in ("hits", "misses"):
        key = f"labkit:response_cache_{name}_total"
        assert after[key] == before[key], name  # not even looked up


def test_the_cache_is_bounded_least_recently_used_out(server):
    before = metrics(server)
    for i in range(4):  # --response-cache 2
        post(server, "sk-free", prompt=f"{PROMPT} {i}")
    after = metrics(server)
    assert after["labkit:response_cache_entries"] == 2
    evicted = (
        after["labkit:response_cache_evictions_total"]
        - before["labkit:response_cache_evictions_total"]
    )
    assert evicted >= 2
    assert post(server, "sk-free", prompt=f"{PROMPT} 3").status_code == 200
    assert (
        metrics(server)["labkit:response_cache_hits_total"]
        == after["labkit:response_cache_hits_total"] + 1
    )


def test_an_open_server_logs_text_only_when_asked(open_server):
    r = post(open_server, "anything", request_id="text-1")
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
    line = log_line(open_server, "text-1")
    assert line["key_id"] == "anonymous" and line["prompt"] == PROMPT
    assert line["completion"] == [r.json()["choices"][0]["text"]]


def test_requests_the_server_refuses_after_charging_are_refunded(open_server):
    """Four at once into a batch of one and a queue of one: the server refuses some (429 queue_full)
    after the key was charged prompt + 200 each; they must give it all back. With refunds the bucket
    ends at least at 1000 minus what the served ones cost; a leak would take 200+ per refusal more."""
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    res = asyncio.run(run_load(open_server.url, [body] * 4, concurrency=4))
    served = [r for r in res.records if r.ok]
    refused = [r for r in res.records if r.status == 429]
    assert refused and len(served) + len(refused) == 4
    assert all("queue_full" in (r.error or "") for r in refused), refused[0].error
    last = post(open_server, "", max_tokens=200, ignore_eos=True)
    cost = last.json()["usage"]["total_tokens"]
    remaining = int(last.headers["x-ratelimit-remaining-tokens"])
    assert remaining >= 1000 - (len(served) + 1) * cost
