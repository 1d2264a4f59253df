"""labkit.workers: the one protocol between labkit and code running in another venv, the client that
starts a worker and reads its answers, and the workers' own request handling. A stand-in worker (written
here) runs in this venv; the real ones need .venv-vllm / .venv-quant and are tested in test_engine_vllm.py,
test_vllm_gptq.py and test_quant_libs.py."""

import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout

import pytest

from labkit.paths import REPO_ROOT
from labkit.workers import quant_client
from labkit.workers.bench_client import PairedRunner, run_offline
from labkit.workers.client import WorkerError, WorkerProcess, run_worker
from labkit.workers.protocol import MARK, encode_request, parse_answer, serve

# protocol.py is standard library only, so the stand-in imports it without labkit (and torch): it starts
# in a fraction of a second
STAND_IN = """
import subprocess
import sys
import time

from protocol import serve

print("a library's own log line, on the same stdout", flush=True)


def handle(request):
    if "exit" in request:
        sys.exit(request["exit"])
    if "sleep" in request:
        time.sleep(request["sleep"])
    if "fail" in request:
        raise ValueError(request["fail"])
    return {"echo": request}


serve(handle)
"""


@pytest.fixture
def stand_in(tmp_path):
    (tmp_path / "stand_in_worker.py").write_text(textwrap.dedent(STAND_IN))
    return {"PYTHONPATH": f"{tmp_path}:{REPO_ROOT / 'labkit' / 'workers'}"}


def test_serve_answers_each_request_and_reports_errors_without_stopping():
    def handle(request):
        if request["x"] < 0:
            raise ValueError("x must be >= 0")
        return {"double": 2 * request["x"]}

    lines = [encode_request({"x": 2}), "\n", encode_request({"x": -1}), encode_request({"x": 5})]
    out = io.StringIO()
    with redirect_stdout(out):
        serve(handle, lines)
    answers = [parse_answer(line) for line in out.getvalue().splitlines()]
    assert answers[0] == {"double": 4} and answers[2] == {"double": 10}
    assert answers[1]["error"] == "ValueError: x must be >= 0"
    assert "Traceback" in answers[1]["traceback"]


def test_only_marked_lines_are_answers_and_paths_travel_as_strings(tmp_path):
    assert parse_answer("INFO loading weights") is None
    assert parse_answer(MARK + '{"a": 1}') == {"a": 1}
    assert json.loads(encode_request({"out": tmp_path})) == {"out": str(tmp_path)}


def test_a_worker_answers_requests_in_turn_despite_its_log_lines(stand_in):
    with WorkerProcess(sys.executable, "stand_in_worker", env=stand_in) as worker:
        assert worker.request({"n": 1}) == {"echo": {"n": 1}}
        assert worker.request({"n": 2}) == {"echo": {"n": 2}}
    assert worker.proc.returncode == 0  # it exits when its stdin closes


def test_a_failed_request_raises_with_the_reason_and_the_worker_goes_on(stand_in):
    with WorkerProcess(sys.executable, "stand_in_worker", env=stand_in) as worker:
        with pytest.raises(WorkerError, match="ValueError: no such task") as err:
            worker.request({"fail": "no such task"})
        assert "Traceback" in str(err.value)
        assert worker.request({"n": 3}) == {"echo": {"n": 3}}


def test_a_dead_or_stuck_worker_is_an_error_not_a_hang(stand_in):
    with pytest.raises(WorkerError, match="exited with code 3"):
        run_worker(sys.executable, "stand_in_worker", {"exit": 3}, env=stand_in)
    with pytest.raises(WorkerError, match="killed after 1 s"):
        run_worker(sys.executable, "stand_in_worker", {"sleep": 30}, timeout=1, env=stand_in)
    with pytest.raises(WorkerError, match="No module named no_such_worker"):
        run_worker(sys.executable, "no_such_worker", {}, env=stand_in)


def test_quant_worker_rejects_unknown_tasks_and_options():
    from labkit.workers.quant_worker import handle

    with pytest.raises(ValueError, match="task must be one of"):
        handle({"task": "gptq-by-hand"})
    with pytest.raises(ValueError, match=r"unknown options \['bitz'\]"):
        handle({"task": "torchao-int8", "bitz": 4})


def test_run_library_without_its_venv_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(quant_client, "libraries_available", lambda: False)
    with pytest.raises(RuntimeError, match="make quant-libs"):
        quant_client.run_library("torchao-int8")


def test_bench_client_rejects_an_unknown_engine():
    with pytest.raises(ValueError, match="'labkit' or 'vllm'"):
        run_offline("tgi", [("Hello", 2)])


def test_a_bench_worker_runs_labkit_engine_twice():
    workload = [("It is a truth universally acknowledged", 6), ("Emma could not help", 3)]
    with PairedRunner("labkit", workload, max_num_seqs=2, torch_threads=1) as runner:
        assert runner.info["engine"] == "labkit" and runner.info["startup_s"] > 0
        first, second = runner.run(), runner.run()
        # a workload of its own, on the same engine
        other = runner.run([("Emma could not help", 5)])
    assert [len(t) for t in first["token_ids"]] == [6, 3]
    assert first["token_ids"] == second["token_ids"]  # greedy: the same tokens every run
    assert first["output_tokens"] == 9 and first["tokens_per_s"] > 0
    assert other["output_tokens"] == 5 and other["token_ids"][0][:3] == first["token_ids"][1]


def test_the_worker_protocol_imports_without_torch():
    """llama.cpp's venv has no torch: `labkit.workers.protocol` (and labkit's package) must not need it."""
    code = (
        "import sys, labkit.workers.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
