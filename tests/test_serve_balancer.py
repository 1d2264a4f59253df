"""HAProxy in front of labkit replicas (labkit/serve/balancer.py): the config, and what clients see.

The config tests need only the haproxy binary (`haproxy -c`); the others start replicas (server, slow).
Everything skips, saying how to install it, where haproxy is missing."""

import json
import subprocess

import pytest

from labkit.serve.balancer import (
    CAP_WINDOW_S,
    FALL,
    INTER_MS,
    POLICIES,
    SESSION_HEADER,
    find_haproxy,
    haproxy_config,
    main,
    time_to_down,
)

SERVERS = [("r0", "127.0.0.1:8001"), ("r1", "127.0.0.1:8002")]


def haproxy() -> str:
    try:
        return find_haproxy()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("cap", [None, 600])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_config_passes_haproxy_check_without_warnings(policy, cap, tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(SERVERS, policy, 8080, stats_port=8404, key_requests_per_minute=cap)
    )
    check = subprocess.run([haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr


def test_policies_health_checks_and_retries_are_in_the_config():
    by_policy = {p: haproxy_config(SERVERS, p) for p in POLICIES}
    assert "balance roundrobin" in by_policy["roundrobin"]
    assert "balance leastconn" in by_policy["leastconn"]
    assert f"balance hdr({SESSION_HEADER})" in by_policy["affinity"]
    assert "hash-type consistent" in by_policy["affinity"]  # only the dead replica's sessions move
    for cfg in by_policy.values():
        assert "option httpchk GET /ready" in cfg and "http-check expect status 200" in cfg
        assert f"inter {INTER_MS}ms fall {FALL}" in cfg
        assert "option http-buffer-request" in cfg and "option redispatch" in cfg
        assert "retry-on conn-failure empty-response 503" in cfg
        for _, address in SERVERS:
            assert f" {address}" in cfg
        assert "frontend stats" not in cfg  # only with a stats_port
    assert "prometheus-exporter" in haproxy_config(SERVERS, stats_port=8404)


def test_the_per_key_cap_is_in_the_frontend_only_when_asked():
    assert "stick-table" not in haproxy_config(SERVERS) and "track-sc0" not in haproxy_config(
        SERVERS
    )
    cfg = haproxy_config(SERVERS, key_requests_per_minute=600)
    frontend = cfg[cfg.index("frontend api") : cfg.index("backend replicas")]
    assert f"store http_req_rate({CAP_WINDOW_S}s)" in frontend
    assert " size " in frontend and " expire " in frontend  # bounded memory
    assert "http-request track-sc0 req.hdr(Authorization)" in frontend
    refusal = next(line for line in frontend.splitlines() if "return status 429" in line)
    assert refusal.endswith("if { sc_http_req_rate(0) gt 600 }")
    assert f"hdr Retry-After {CAP_WINDOW_S} " in refusal
    error = json.loads(refusal[refusal.index("'") + 1 : refusal.rindex("'")])["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "load balancer" in error["message"] and "600" in error["message"]
    with pytest.raises(ValueError, match="key_requests_per_minute"):
        haproxy_config(SERVERS, key_requests_per_minute=0)


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="roundrobin"):
        haproxy_config(SERVERS, "random")
    with pytest.raises(ValueError, match="at least one"):
        haproxy_config([], "leastconn")


def test_time_to_down_is_between_fall_minus_one_and_fall_check_intervals():
    assert time_to_down(500, 2) == (0.5, 1.0)
    assert time_to_down(1000, 3) == (2.0, 3.0)
    fastest, slowest = time_to_down()
    assert slowest <= 1.0  # the lesson's promise: a dead replica leaves within about a second


def test_the_command_line_prints_the_config(capsys):
    main(
        [
            "--servers",
            "a:8000,b:8000",
            "--policy",
            "affinity",
            "--port",
            "9000",
            "--bind",
            "0.0.0.0",
            "--key-requests-per-minute",
            "120",
        ]
    )
    out = capsys.readouterr().out
    assert out == haproxy_config(
        [("r0", "a:8000"), ("r1", "b:8000")],
        "affinity",
        9000,
        8404,
        "0.0.0.0",
        key_requests_per_minute=120,
    )


def test_the_prefix_cache_counters_count_the_engines_tokens_across_updates_and_restarts():
    from types import SimpleNamespace

    from labkit.serve.metrics import ServerMetrics, parse_metrics

    m = ServerMetrics("course")

    def update(queries, hits):
        stats = SimpleNamespace(
            num_running=0,
            num_waiting=0,
            kv_usage=0.0,
            prefix_cache_hit_rate=0.0,
            kv_blocks_used=0,
            kv_blocks_total=1,
            num_preemptions=0,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )
        m.update_engine_stats(stats, 0)
        values = parse_metrics(m.render()[0].decode())
        return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]

    assert update(64, 16) == (64, 16)
    assert update(96, 48) == (96, 48)  # the engine's totals, not their sum
    assert update(32, 0) == (128, 48)  # a restarted engine counts from 0: its 32 are new


def test_a_backend_with_no_live_replica_answers_a_clear_503():
    import httpx

    from labkit.serve.balancer import LoadBalancer
    from labkit.serve.launch import free_port

    haproxy()
    with LoadBalancer([("r0", f"127.0.0.1:{free_port()}")], "leastconn") as lb:
        r = httpx.post(lb.url + "/v1/completions", json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_replica" and r.headers["retry-after"] == "1"


# ---- with replicas (server, slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas():
    from labkit.serve.replicas import Replicas

    haproxy()
    # a small batch per replica, so requests queue (not yet answered: retryable) when one dies
    with Replicas(2, threads=1, max_num_seqs=4) as reps:
        yield reps


def test_affinity_keeps_each_session_on_one_replica_and_round_robin_does_not(replicas):
    import asyncio

    import httpx

    from labkit.serve.balancer import LoadBalancer
    from labkit.serve.loadgen.conversations import replicas_per_session, run_conversations
    from labkit.serve.metrics import parse_metrics

    def prefix_counters():
        values = [parse_metrics(httpx.get(s.url + "/metrics").text) for s in replicas.servers]
        return [
            (v["vllm:prefix_cache_queries_total"], v["vllm:prefix_cache_hits_total"])
            for v in values
        ]

    with LoadBalancer(replicas.addresses(), "affinity") as lb:
        before = prefix_counters()
        turns = asyncio.run(run_conversations(lb.url, 6, 3, max_tokens=8, seed=3))
        after = prefix_counters()
    assert len(turns) == 18 and all(t.record.ok for t in turns)
    assert all(len(served) == 1 for served in replicas_per_session(turns).values())
    queries = sum(a[0] - b[0] for a, b in zip(after, before))
    hits = sum(a[1] - b[1] for a, b in zip(after, before))
    assert queries > 0 and hits / queries > 0.5  # turns 2 and 3 find the conversation so far

    with LoadBalancer(
        replicas.addresses(), "roundrobin"
    ) as lb:  # one client: r0, r1, r0 (or r1...)
        turns = asyncio.run(run_conversations(lb.url, 1, 3, max_tokens=8, seed=4))
    first, second, third = [t.served_by for t in turns]
    assert {first, second} == {"r0", "r1"} and third == first


def test_the_key_cap_answers_429_from_haproxy_past_n_requests_and_spares_other_keys(replicas):

    import httpx

    from labkit.serve.balancer import LoadBalancer

    cap = 3
    payload = {"prompt": "It is a truth", "max_tokens": 2}

    def send(key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(lb.url + "/v1/completions", json=payload, headers=headers, timeout=60)

    with LoadBalancer(replicas.addresses(), "leastconn", key_requests_per_minute=cap) as lb:
        a = [send("sk-a") for _ in range(cap + 2)]
        b = send("sk-b")
        lines = [line for line in lb.request_lines(cap + 3) if "/v1/completions" in line]
        log = lb.output()
    assert [r.status_code for r in a] == [200] * cap + [429, 429], [r.text for r in a]
    assert b.status_code == 200
    for refused in a[cap:]:
        assert refused.headers["retry-after"] == str(CAP_WINDOW_S)
        assert "x-served-by" not in refused.headers  # no replica saw it
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "load balancer" in error["message"]
    # HAProxy's log: the refusals went to no server, the answers each to a replica
    assert sum(" 429 server=<NOSRV>" in line for line in lines) == 2, log
    assert sum(" 200 server=r" in line for line in lines) == cap + 1, log


def _check_failover(replicas, graceful: bool):
    import asyncio

    from labkit.serve.balancer import LoadBalancer
    from labkit.serve.failover import kill_under_load
    from labkit.serve.loadgen import run_load, workload

    with LoadBalancer(replicas.addresses(), "leastconn") as lb:
        payloads = workload(96, seed=11, min_tokens=16, max_tokens=48)
        report = asyncio.run(
            kill_under_load(replicas, lb, payloads, 32, kill_after=1.0, graceful=graceful)
        )
        assert report.time_to_down is not None, lb.output()[-3000:]
        # after DOWN every request succeeds, on the replica left
        after = asyncio.run(run_load(lb.url, workload(8, seed=12, max_tokens=16), 4))
        assert after.summary()["ok"] == 8
        assert lb.server_stats()["r1"]["status"].startswith("DOWN")
    replicas.restart(1)
    return report


def test_a_crashed_replica_loses_no_request_that_had_not_started_streaming(replicas):
    report = _check_failover(replicas, graceful=False)
    assert report.outcomes["lost"] == 0, report.load.records
    assert report.retried + report.outcomes["cut"] > 0  # the replica died under load
    # the streams cut mid-way are errors the clients saw, one for each HAProxy saw the replica drop
    assert report.outcomes["cut"] == report.cut_by_server
    cut = [r for r in report.load.records if r.status == 200 and not r.ok]
    assert all("closed the connection" in (r.error or "") for r in cut)
    assert (
        report.load.summary()["errors"] == report.outcomes["cut"] + report.outcomes["refused_503"]
    )
    assert report.sent_to_victim_after_down == 0


def test_a_draining_replica_finishes_its_streams_and_nothing_is_lost(replicas):
    report = _check_failover(replicas, graceful=True)
    assert report.outcomes["lost"] == 0 and report.outcomes["cut"] == 0
    assert report.cut_by_server == 0 and report.sent_to_victim_after_down == 0
    # /ready said 503 (or, had the drain already ended, the port was closed)
    assert any(
        "Layer7 wrong status" in line or "Layer4 connection problem" in line
        for line in report.health_log
    ), report.health_log
