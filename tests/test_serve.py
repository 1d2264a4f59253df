"""labkit.serve tested for real: a server subprocess on 127.0.0.1, called over HTTP and with the
official `openai` client. Greedy outputs are compared with the offline engine, not with constants."""

import asyncio
import json
import re
import signal
import time

import httpx
import openai
import pytest

from labkit.serve.launch import ServerProcess
from labkit.serve.loadgen import percentile, run_load, workload

PROMPT = "It is a truth universally acknowledged"


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            key = s.name + (
                f"{{{s.labels['finished_reason']}}}" if "finished_reason" in s.labels else ""
            )
            values[key] = values.get(key, 0.0) + s.value
    return values


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = scrape(url)
        if (
            m["labkit:active_requests"] == 0
            and m["labkit:kv_blocks_used"] == 0
            or time.time() > deadline
        ):
            return m
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server():
    # compiled, as a production server runs (--warm-up compiles the decode step before /ready): every
    # test below checks the compiled engine against the offline (eager) one
    with ServerProcess(max_num_seqs=16, threads=1, warm_up=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline():
    from labkit.engine import LLM

    return LLM(None, max_num_seqs=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy(llm, prompt, n, **kw):
    from labkit.engine import SamplingParams

    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, **kw))[0].outputs[0]


def test_models_health_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "course" and models["data"][0]["max_model_len"] == 512


def test_completion_matches_offline_engine(server, offline):
    r = httpx.post(
        server.url + "/v1/completions",
        json={
            "model": "course",
            "prompt": PROMPT,
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
        },
    ).json()
    want = greedy(offline, PROMPT, 24, ignore_eos=True)
    assert r["choices"][0]["text"] == want.text
    assert r["choices"][0]["finish_reason"] == "length"
    assert (
        r["usage"]["completion_tokens"] == 24
        and r["usage"]["total_tokens"] == 24 + r["usage"]["prompt_tokens"]
    )


def test_stream_equals_non_stream(server):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    events = []
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full
    assert len(chunks) > 2, "tokens must arrive as separate chunks, not one blob at the end"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_openai_client_completions_and_chat(client):
    c = client.completions.create(model="course", prompt=PROMPT, max_tokens=12, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 12
    pieces = [
        ch.choices[0].text
        for ch in client.completions.create(
            model="course", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )
        if ch.choices
    ]
    assert "".join(pieces) == c.choices[0].text

    messages = [{"role": "user", "content": "Will you dance?"}]
    chat = client.chat.completions.create(
        model="course", messages=messages, max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model="course",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage = [], None
    for ch in stream:
        if ch.choices:
            deltas.append(ch.choices[0].delta.content or "")
        if ch.usage:
            usage = ch.usage
    assert "".join(deltas) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens


def test_chat_uses_the_chat_template(server, offline):
    from labkit import load_tokenizer

    tok = load_tokenizer()
    messages = [{"role": "user", "content": "Good morning"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 10, "temperature": 0},
    ).json()
    assert r["choices"][0]["message"]["content"] == greedy(offline, prompt, 10).text


def test_stop_string_truncates_and_finishes(server, offline):
    free = greedy(offline, PROMPT, 40, ignore_eos=True).text
    words = re.findall(r" \w+", free)
    stop = words[len(words) // 2]  # a string the model will really produce mid-way
    want = free[: free.find(stop)]
    for stream in (False, True):
        body = {
            "prompt": PROMPT,
            "max_tokens": 40,
            "temperature": 0,
            "ignore_eos": True,
            "stop": [stop],
            "stream": stream,
        }
        if stream:
            with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
                chunks = [
                    json.loads(line[6:])
                    for line in r.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"
                ]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
            text, reason = choice["text"], choice["finish_reason"]
        assert text == want and reason == "stop"


def test_seed_generate_endpoint(server):
    r = httpx.post(
        server.url + "/generate",
        json={"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0.8, "seed": 3},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    again = httpx.post(
        server.url + "/generate",
        json={"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0.8, "seed": 3},
    )
    assert again.json()["text"] == r.json()["text"], "same seed, same sample"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"prompt": "word " * 600, "max_tokens": 8}, 400, "maximum context length is 512"),
        ({"prompt": PROMPT, "max_tokens": 510}, 400, "maximum context length is 512"),
        ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
        ({"prompt": PROMPT, "n": 17}, 400, "n"),
        ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "empty"),
        ({"prompt": [1, 2, 99999]}, 400, "token ids"),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404, "does not exist"),
        ({"max_tokens": 3}, 400, "prompt"),
    ],
)
def test_errors_in_openai_shape(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="course", prompt="word " * 600, max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=8)


def test_client_disconnect_frees_blocks(server):
    before = scrape(server.url)["vllm:generation_tokens_total"]
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True},
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # hang up mid-stream
    m = wait_idle(server.url)
    assert m["labkit:kv_blocks_used"] == 0 and m["labkit:active_requests"] == 0
    time.sleep(0.5)
    generated = scrape(server.url)["vllm:generation_tokens_total"] - before
    assert generated < 200, f"the sequence kept decoding after the client left ({generated} tokens)"


def test_many_random_disconnects_leak_nothing(server):
    payloads = workload(300, seed=2, min_tokens=4, max_tokens=24)
    res = asyncio.run(run_load(server.url, payloads, concurrency=32, disconnect_prob=0.5, seed=2))
    s = res.summary()
    assert s["errors"] == 0 and s["disconnected"] > 100 and s["ok"] + s["disconnected"] == 300
    m = wait_idle(server.url)
    assert m["labkit:kv_blocks_used"] == 0 and m["labkit:active_requests"] == 0
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


def test_metrics_use_vllm_names_and_count(server):
    m0 = scrape(server.url)
    n = 3
    for _ in range(n):
        httpx.post(
            server.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True},
        )
    m = scrape(server.url)
    assert (
        m["vllm:e2e_request_latency_seconds_count"] - m0["vllm:e2e_request_latency_seconds_count"]
        == n
    )
    assert (
        m["vllm:time_to_first_token_seconds_count"] - m0["vllm:time_to_first_token_seconds_count"]
        == n
    )
    assert m["vllm:generation_tokens_total"] - m0["vllm:generation_tokens_total"] == 5 * n
    assert (
        m["vllm:request_success_total{length}"] - m0.get("vllm:request_success_total{length}", 0)
        == n
    )
    assert m["http_requests_total"] > m0["http_requests_total"]
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:time_per_output_token_seconds_count",
        "vllm:request_time_per_output_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
    ):
        assert name in m


def test_load_generator_concurrent_streams(server):
    res = asyncio.run(
        run_load(server.url, workload(16, seed=3, min_tokens=8, max_tokens=16), concurrency=8)
    )
    s = res.summary()
    assert s["ok"] == 16 and s["errors"] == 0
    assert s["output_tokens"] == sum(
        p["max_tokens"] for p in workload(16, seed=3, min_tokens=8, max_tokens=16)
    )
    assert (
        0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["tpot_p50_s"] > 0 and s["throughput_tok_s"] > 0
    )


def test_api_key_and_queue_limit():
    with ServerProcess(api_key="sekret", max_num_seqs=1, max_waiting=1, threads=1) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == "course"
        # the load generator's own HTTP client: an error response (Content-Length body) is an error, with its
        # status; the same keep-alive connection then serves the next request
        payloads = workload(2, seed=4, min_tokens=2, max_tokens=3)
        bad = asyncio.run(run_load(srv.url, payloads, concurrency=1, api_key="wrong")).records
        assert [r.ok for r in bad] == [False, False] and all(
            r.error.startswith("HTTP 401") for r in bad
        )
        ok = asyncio.run(run_load(srv.url, payloads, concurrency=1, api_key="sekret")).summary()
        assert ok["ok"] == 2 and ok["errors"] == 0

        async def burst(n=8):  # n requests at once; the server holds at most 1 running + 1 waiting
            async with httpx.AsyncClient(
                headers={"Authorization": "Bearer sekret"}, timeout=120
            ) as http:
                body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
                return await asyncio.gather(
                    *(http.post(srv.url + "/v1/completions", json=body) for _ in range(n))
                )

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
        refused = [r for r in responses if r.status_code == 429]
        assert all(
            r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            for r in refused
        )
        assert all(
            r.json()["usage"]["completion_tokens"] == 400 for r in responses if r.status_code == 200
        )


def test_sigterm_drains_in_flight_streams():
    """SIGTERM (what `kubectl delete pod` sends): while a stream is still running, /ready says 503 so the
    load balancer moves traffic away, a new request is refused with a clear 503 + Retry-After (not a
    refused connection), /health stays 200; the in-flight stream completes in full; then the process exits."""
    srv = ServerProcess(threads=1, drain_timeout=60).start()
    try:
        with httpx.stream(
            "POST",
            srv.url + "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            timeout=120,
        ) as r:
            lines = r.iter_lines()
            first = next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            while (
                ready := httpx.get(srv.url + "/ready")
            ).status_code == 200 and time.time() < deadline:
                time.sleep(0.02)  # the signal is handled asynchronously
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            # alive: liveness must not kill it
            assert httpx.get(srv.url + "/health").status_code == 200
            refused = httpx.post(
                srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            err = refused.json()["error"]
            assert err["code"] == "server_draining" and "shutting down" in err["message"]
            assert scrape(srv.url)["labkit:active_requests"] == 1, (
                "the stream must still be in flight here"
            )
            rest = [first] + list(lines)
        data = [line[6:] for line in rest if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 400, (
            "the in-flight stream was cut short"
        )
        code = srv.proc.wait(30)
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
        assert "Traceback" not in srv.output()
        with pytest.raises(httpx.ConnectError):  # and after the drain it is gone
            httpx.get(srv.url + "/ready")
    finally:
        srv.stop()


def test_sigterm_exits_promptly_when_idle():
    srv = ServerProcess(threads=1, drain_timeout=600).start()
    # SIGKILL (-9) if it sat out its 600 s drain budget with nothing to do
    code = srv.stop(timeout=60)
    assert code in (0, -signal.SIGTERM), code


def vllm_venv() -> tuple[bool, str]:
    from labkit.engine.vllm_runner import vllm_available

    return vllm_available()


@pytest.mark.skipif(not vllm_venv()[0], reason=vllm_venv()[1])
def test_backend_vllm_serves_the_same_api(offline):
    """`labkit serve --backend vllm` hands over to vLLM's own OpenAI server (from .venv-vllm): the same
    greedy text as labkit's engine, the `openai` client and our load generator work against it unchanged,
    and every vLLM metric our Grafana dashboard and alert rules query exists in real vLLM's /metrics."""
    import pathlib

    import yaml

    with ServerProcess(backend="vllm", max_num_seqs=4, startup_timeout=600) as srv:
        r = httpx.post(
            srv.url + "/v1/completions",
            json={
                "model": "course",
                "prompt": PROMPT,
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=120,
        ).json()
        assert r["choices"][0]["text"] == greedy(offline, PROMPT, 12, ignore_eos=True).text
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        pieces = [
            ch.choices[0].text
            for ch in client.completions.create(
                model="course", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
            )
        ]
        assert "".join(pieces) == r["choices"][0]["text"]
        res = asyncio.run(
            run_load(srv.url, workload(8, seed=3, min_tokens=4, max_tokens=8), concurrency=4)
        ).summary()
        assert res["ok"] == 8 and res["errors"] == 0
        from prometheus_client.parser import text_string_to_metric_families

        exported = {
            s.name
            for f in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
            for s in f.samples
        }
    mon = pathlib.Path(__file__).resolve().parent.parent / "monitoring"
    dash = json.loads((mon / "grafana" / "dashboards" / "llm-serving.json").read_text())
    rules = yaml.safe_load((mon / "alert_rules.yml").read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queries += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set(re.findall(r"\b(vllm:[a-z0-9_]+)", " ".join(queries)))
    assert used and not used - exported, f"not exported by vLLM: {sorted(used - exported)}"


def test_percentile_matches_numpy():
    import numpy as np

    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_serves_a_gptq_checkpoint(tmp_path):
    """`labkit serve --quantized DIR` runs labkit's 4-bit GPTQ export (QuantLinear) and answers exactly
    what the offline engine answers on the same loaded checkpoint."""
    from labkit import load_model
    from labkit.engine import LLM
    from labkit.quant import export_gptq, load_gptq, rtn_quantize_model

    model, tok = load_model()
    out = export_gptq(model, rtn_quantize_model(model, 4, 64), tmp_path / "q4", tokenizer=tok)
    qmodel, qtok = load_gptq(out)
    want = greedy(LLM(qmodel, tokenizer=qtok or tok), PROMPT, 12, ignore_eos=True).text
    with ServerProcess(quantized=str(out), threads=1) as srv:
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True},
            timeout=60,
        ).json()
    assert r["choices"][0]["text"] == want
