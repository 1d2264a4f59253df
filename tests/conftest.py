import os
from collections import defaultdict

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the course must never need the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one torch thread each (inherited by the notebooks'
    # kernels and the servers they start), so two busy workers never fight over cores with spinning threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Which tests `make unit` leaves out, in one place (the markers are declared in pyproject.toml):
#   server    starts a server or an engine process (ports, subprocesses, signals)
#   external  needs a separate venv (.venv-vllm, .venv-quant, .venv-grading) or the package index
#   slow      more than a few seconds on a 2-core CPU
# Keys are a test module, or module::test for one test (all its parameters).
MARKS = {
    "test_serve.py": ("server", "slow"),
    "test_serve.py::test_backend_vllm_serves_the_same_api": ("external",),
    "test_serve_engine_process.py": ("server", "slow"),
    "test_serve_hardening.py": ("server", "slow"),
    "test_serve_fuzz.py": ("server", "slow"),
    "test_serve_logprobs.py": ("server", "slow"),
    "test_serve_gateway.py": ("server", "slow"),
    "test_serve_openloop.py::test_past_saturation_the_server_refuses_with_retry_after_and_bounds_its_queue": (
        "server",
        "slow",
    ),
    "test_serve_lm_eval.py": ("server", "external", "slow"),
    "test_serve_vllm_bench.py": ("server", "external", "slow"),
    # the HAProxy config tests are quick; these start replicas
    **{
        f"test_serve_balancer.py::{name}": ("server", "slow")
        for name in (
            "test_affinity_keeps_each_session_on_one_replica_and_round_robin_does_not",
            "test_the_key_cap_answers_429_from_haproxy_past_n_requests_and_spares_other_keys",
            "test_a_crashed_replica_loses_no_request_that_had_not_started_streaming",
            "test_a_draining_replica_finishes_its_streams_and_nothing_is_lost",
        )
    },
    "test_serve_balancer.py::test_a_backend_with_no_live_replica_answers_a_clear_503": ("server",),
    "test_quant_libs.py": ("external", "slow"),
    **{
        f"test_grading.py::{name}": ("external", "slow")
        for name in (
            "test_nbgraders_student_copies_are_notebooks_plus_the_test_cells",
            "test_nbgrader_gives_the_reference_full_marks_and_a_wrong_answer_loses_its_points",
        )
    },
    # downloads the course's wheels from the package index, then builds a venv from them
    "test_wheelhouse.py::test_the_course_venv_builds_from_the_wheelhouse_with_no_index": (
        "external",
        "slow",
    ),
    "test_engine_vllm.py": ("external", "slow"),
    "test_vllm_gptq.py": ("external", "slow"),
    "test_workers.py::test_a_bench_worker_runs_labkit_engine_twice": ("slow",),
    "test_train.py::test_a_short_training_run_produces_a_loadable_llama": ("slow",),
    # the course model through the engine: 25-50 s of CPU per test measured on 2 busy cores
    "test_engine.py": ("slow",),
    # LoRA: the course model with adapters through the engine, and one server with --lora-modules
    "test_lora.py": ("slow",),
    **{
        f"test_lora.py::{name}": ("server",)
        for name in (
            "test_server_lists_and_serves_lora_modules",
            "test_server_loads_and_unloads_adapters",
            "test_server_refuses_bad_adapters_and_the_batch_carries_on",
        )
    },
    "test_engine_requests.py": ("slow",),
    "test_golden.py": ("slow",),
    "test_structured_output.py": ("slow",),  # SmolLM2 through the engine, a compiled step included
    "test_serve_structured.py": ("server", "slow"),
    "test_engine_compiled.py": (
        "slow",
    ),  # compiles the course model's decode step at several sizes
}


NEEDS_HAPROXY = {"08b_scale_out.ipynb"}  # notebooks built around a load balancer


def haproxy_missing() -> str | None:
    from labkit.serve.balancer import find_haproxy

    try:
        find_haproxy()
    except FileNotFoundError as err:
        return str(err)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
            if item.path.name in NEEDS_HAPROXY and (reason := haproxy_missing()):
                item.add_marker(pytest.mark.skip(reason=reason))
            continue
        name = getattr(item, "originalname", item.name)
        for key in (item.path.name, f"{item.path.name}::{name}"):
            for mark in MARKS.get(key, ()):
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session")
def course():
    """The shipped course model and tokenizer, loaded once for the whole test session."""
    import labkit

    return labkit.load_model(device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (provisioned by `make setup`), loaded once for the whole test session."""
    import labkit

    return labkit.load_model("smollm2", device="cpu")


def pytest_terminal_summary(terminalreporter):
    """Each notebook's time (its cells' set-up, run and teardown), so every CI log records what
    docs/workshop.md quotes. Under `make test` a notebook runs on one of two workers, one torch thread each."""
    totals: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            path = getattr(report, "nodeid", "").split("::")[0]
            if path.endswith(".ipynb") and hasattr(report, "duration"):
                totals[path] += report.duration
    if totals:
        terminalreporter.write_sep("=", "notebook durations")
        for path, seconds in sorted(totals.items()):
            terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
