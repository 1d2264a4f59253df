"""The engine in its own process (labkit serve's default, engine_process.py): what must hold when the
engine and the HTTP server are two processes. The common API behaviour (same text as offline, disconnects
free KV blocks, drain on SIGTERM...) is tested in test_serve.py, which runs this default mode; the
in-process thread (--engine-mode thread) is checked here against the same offline output."""

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from labkit.serve.launch import ServerProcess

PROMPT = "It is a truth universally acknowledged"


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids, timeout: float = 20.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


def engine_pid(srv: ServerProcess) -> int:
    engines = [pid for pid, role in srv.processes().items() if role == "engine"]
    assert len(engines) == 1, srv.processes()
    return engines[0]


def greedy_text(n: int) -> str:
    from labkit.engine import LLM, SamplingParams

    out = LLM(None, max_num_seqs=4).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    )
    return out[0].outputs[0].text


def test_the_engine_runs_in_its_own_process():
    with ServerProcess(threads=1) as srv:
        roles = srv.processes()
        assert list(roles.values()).count("engine") == 1 and roles[srv.proc.pid] == "server"
        pid = engine_pid(srv)
        # the tokens are computed in the child: its CPU time grows with the work, the HTTP process's much less
        cpu0, http0 = srv.cpu_seconds("engine"), srv.cpu_seconds("server")
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        assert (
            httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["usage"][
                "completion_tokens"
            ]
            == 200
        )
        assert srv.cpu_seconds("engine") - cpu0 > srv.cpu_seconds("server") - http0
        assert engine_pid(srv) == pid


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_both_engine_modes_match_offline_reject_and_free_blocks(mode):
    want = greedy_text(24)
    # 30 blocks of 16 tokens: a request can fit the 512-token context and still not fit the KV cache, which
    # only the engine's add_request knows: its refusal must come back as the same clear 400
    with ServerProcess(threads=1, engine_mode=mode, num_blocks=30, block_size=16) as srv:
        assert srv.output().count(f"engine={mode}") == 1
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True},
            timeout=60,
        ).json()
        assert r["choices"][0]["text"] == want
        for stream in (False, True):
            big = httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 495, "stream": stream},
                timeout=60,
            )
            assert big.status_code == 400 and "KV cache" in big.json()["error"]["message"], big.text
        with httpx.stream(
            "POST",
            srv.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True},
        ) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 4:
                    break  # hang up mid-stream
        from labkit.serve.metrics import parse_metrics

        deadline = time.time() + 20
        while time.time() < deadline:
            m = parse_metrics(httpx.get(srv.url + "/metrics").text)
            if m["labkit:kv_blocks_used"] == 0 and m["labkit:active_requests"] == 0:
                break
            time.sleep(0.1)
        assert m["labkit:kv_blocks_used"] == 0 and m["labkit:active_requests"] == 0
        assert m["vllm:request_success_total"] >= 2  # the completed request and the aborted stream


def wait_ready(srv: ServerProcess, timeout: float) -> float:
    """Seconds until /ready says 200 (the timeout if it never does)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(srv.url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return time.monotonic() - t0


def test_engine_process_death_fails_clients_then_recovers():
    """kill -9 the engine process mid-request: a running stream ends with an error event and a waiting
    non-streaming request gets a 503 (no request hangs); the server restarts the engine and is ready
    again within 2x its start-up time, with the same answers as before."""
    t0 = time.monotonic()
    srv = ServerProcess(threads=1, max_num_seqs=4).start()
    startup = time.monotonic() - t0
    try:
        greedy = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        before = httpx.post(srv.url + "/v1/completions", json=greedy, timeout=60).json()
        body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
        with (
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            httpx.stream(
                "POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60
            ) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # tokens are flowing
            in_flight = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
            time.sleep(0.3)
            old = engine_pid(srv)
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            data = [line[6:] for line in lines if line.startswith("data: ")]
            assert data[-1] != "[DONE]"
            err = json.loads(data[-1])["error"]
            assert "engine process" in err["message"] and err["type"] == "server_error"
            refused = in_flight.result()
        assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}  # alive: do not kill it
        wait_ready(srv, timeout=2 * startup + 10)
        recovery = time.monotonic() - killed
        assert httpx.get(srv.url + "/ready").status_code == 200, srv.output()
        assert recovery <= 2 * startup, (
            f"ready {recovery:.1f}s after the kill; start-up {startup:.1f}s"
        )
        assert engine_pid(srv) != old
        after = httpx.post(srv.url + "/v1/completions", json=greedy, timeout=60).json()
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        log = srv.output()
        assert "died (killed by signal SIGKILL)" in log and "restart 1" in log, log
    finally:
        code = srv.stop()
    assert code in (0, -signal.SIGTERM), srv.output()


def test_a_crash_loop_is_bounded_and_ready_says_why():
    """After more deaths than --max-engine-restarts within the window, the server stops restarting:
    /ready and /health stay 503 and say why, requests get a clean 503."""
    srv = ServerProcess(threads=1, max_engine_restarts=0).start()
    try:
        os.kill(engine_pid(srv), signal.SIGKILL)
        deadline = time.time() + 20
        while (r := httpx.get(srv.url + "/ready")).json()["status"] != "failed":
            assert time.time() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 503 and "died 1 times" in r.json()["reason"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        refused = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert (
            refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        )
        time.sleep(1.0)
        assert [role for role in srv.processes().values()].count("engine") == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_no_orphan_processes_when_the_server_stops(how):
    """SIGTERM: the server stops its engine process after the drain. SIGKILL (no chance to clean up): the
    engine process dies with it (PR_SET_PDEATHSIG), and multiprocessing's helper follows."""
    srv = ServerProcess(threads=1).start()
    pids = list(srv.processes())
    assert len(pids) >= 2
    srv.proc.send_signal(how)
    srv.proc.wait(60)
    assert wait_gone(pids) == [], {
        p: open(f"/proc/{p}/cmdline").read() for p in pids if not gone(p)
    }


def test_a_model_that_fails_to_load_fails_startup_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="during startup") as err:
        ServerProcess(model=str(tmp_path / "no-such-model"), startup_timeout=120).start()
    assert "no-such-model" in str(err.value)


def test_ctrl_c_to_the_process_group_still_drains():
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the engine process included: it must
    ignore it, so the server can drain (the in-flight stream completes) before stopping the engine."""
    srv = ServerProcess(threads=1, drain_timeout=60).start()
    pids = list(srv.processes())
    try:
        with httpx.stream(
            "POST",
            srv.url + "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": 300,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            timeout=60,
        ) as r:
            lines = r.iter_lines()
            first = next(lines)
            os.killpg(srv.proc.pid, signal.SIGINT)
            data = [line[6:] for line in [first, *lines] if line.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 300
        assert srv.proc.wait(30) == 130 and "Traceback" not in srv.output()
        assert wait_gone(pids) == []
    finally:
        srv.stop()
