"""HAProxy in front of labkit replicas (labkit/serve/balancer.py): the config, and what clients see.

The config tests need only the haproxy binary (`haproxy -c`); the others start replicas (server, slow).
Everything skips, saying how to install it, where haproxy is missing."""

import subprocess

import pytest

from labkit.serve.balancer import (
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


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_config_passes_haproxy_check_without_warnings(policy, tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(SERVERS, policy, 8080, stats_port=8404))
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
        ]
    )
    out = capsys.readouterr().out
    assert out == haproxy_config(
        [("r0", "a:8000"), ("r1", "b:8000")], "affinity", 9000, 8404, "0.0.0.0"
    )
