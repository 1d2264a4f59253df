"""`make lab`'s JupyterLab defaults: no "get notified about official Jupyter news?" pop-up for a new student.

mk/lab-overrides.json is installed by the Makefile as the venv's share/jupyter/lab/settings/overrides.json,
where JupyterLab reads default overrides (its application settings directory)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ROOT / "mk" / "lab-overrides.json"
PLUGIN = "@jupyterlab/apputils-extension:notification"


def test_the_overrides_turn_news_off_with_values_the_schema_allows():
    settings = json.loads(OVERRIDES.read_text())[PLUGIN]
    assert settings["fetchNews"] == "false"  # a string: the schema's "Never"
    schema_file = Path(sys.prefix, "share/jupyter/lab/schemas", *PLUGIN.split(":")).with_suffix(
        ".json"
    )
    if not schema_file.exists():
        pytest.skip(f"JupyterLab's schema is not installed here ({schema_file})")
    props = json.loads(schema_file.read_text())["properties"]
    assert {"const": "false", "title": "Never"} in props["fetchNews"]["oneOf"]
    assert set(settings) <= set(props)
    assert isinstance(settings["checkForUpdates"], bool)


def test_make_lab_installs_them_where_jupyterlab_reads_overrides(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    plan = subprocess.run(
        ["make", "-n", "lab", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    target = venv / "share/jupyter/lab/settings/overrides.json"
    assert f"cp mk/lab-overrides.json {target}" in plan
    assert plan.index(str(target)) < plan.index("jupyter lab")
