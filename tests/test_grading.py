"""Grading with nbgrader (labkit.grading): every exercise is a test cell worth points, and nbgrader's whole
path (generate_assignment, autograde, export) scores a reference and a wrong submission as it should."""

import csv
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from test_exercises import EXERCISES

import labkit.checks
from labkit.exercises import NOTEBOOKS_DIR, SOLUTIONS_DIR
from labkit.grading import (
    KERNEL_NAME,
    NotGradable,
    exercises_in,
    grade,
    nbgrader_source,
    worth,
    write_course,
)
from labkit.workers.venvs import GRADING_VENV


def test_every_exercise_becomes_one_test_cell_worth_its_points():
    graded = []
    for path in sorted(SOLUTIONS_DIR.glob("*.ipynb")):
        nb = nbgrader_source(nbformat.read(path, as_version=4))
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader")
            if meta and meta["grade"]:
                name = meta["grade_id"].removeprefix("test_")
                assert cell.source.endswith(f'grade("{name}")') and meta["locked"]
                assert meta["points"] == worth(name)
                graded.append(name)
    assert sorted(graded) == sorted(EXERCISES), "each exercise's check is graded exactly once"


def test_grade_scores_the_latest_verdict_and_says_when_there_is_none(capsys):
    solved = labkit.checks.reference_perplexity_from_nll
    labkit.checks.VERDICTS.pop("perplexity_from_nll", None)
    with pytest.raises(NotGradable, match="not gradable here"):
        grade("perplexity_from_nll")
    labkit.checks.check_perplexity_from_nll(lambda nll, n: nll / n)
    assert grade("perplexity_from_nll") == 0
    labkit.checks.check_perplexity_from_nll(solved)  # fixed and run again: the new verdict counts
    assert grade("perplexity_from_nll") == worth("perplexity_from_nll")
    assert "1 of 1 point(s)" in capsys.readouterr().out


def test_only_a_name_checked_under_its_own_name_is_an_exercise():
    source = "f = check_f(f, model)\ng = check_h(g)\nprint(check_f)"
    assert exercises_in(source) == ["f"]
    unchecked = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    ### END SOLUTION")]
    )
    with pytest.raises(ValueError, match="no `name = check_name"):
        nbgrader_source(unchecked)


def test_make_grading_registers_the_kernel_that_nbgrader_is_told_to_use(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    plan = subprocess.run(
        ["make", "-n", "grading", f"GRADING_VENV={tmp_path}/grading"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"--prefix {tmp_path}/grading --name {KERNEL_NAME} " in plan


# the whole path, on the cheapest notebook with several exercises (three, in two cells); ~1.5 min on 2 cores
NOTEBOOK, BROKEN = "01_quantization_basics", "quantize_asymmetric"
RIGHT, WRONG = "zero = torch.round(-lo / scale).clamp(0, maxq)", "zero = torch.zeros(())"


def _nbgrader(course: Path, *args: str) -> None:
    bin_dir = GRADING_VENV / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # it calls alembic
    done = subprocess.run(
        [bin_dir / "nbgrader", *args],
        cwd=course,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"nbgrader {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def _submit(course: Path, student: str, answers: dict[str, str]) -> None:
    """The released notebook with every answer cell filled in, as a student hands it in."""
    nb = nbformat.read(course / "release/course" / f"{NOTEBOOK}.ipynb", as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    folder = course / "submitted" / student / "course"
    folder.mkdir(parents=True)
    nbformat.write(nb, folder / f"{NOTEBOOK}.ipynb")


needs_nbgrader = pytest.mark.skipif(
    not (GRADING_VENV / ".installed").exists(),
    reason=f"nbgrader's venv {GRADING_VENV} is missing: build it with `make grading`",
)


@needs_nbgrader
def test_nbgraders_student_copies_are_notebooks_plus_the_test_cells(tmp_path):
    names = sorted(p.stem for p in SOLUTIONS_DIR.glob("*.ipynb"))
    write_course(tmp_path, names)
    _nbgrader(tmp_path, "generate_assignment", "course")
    for name in names:
        released = nbformat.read(tmp_path / "release/course" / f"{name}.ipynb", as_version=4)
        student = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        assert [
            c.source for c in released.cells if not c.metadata.get("nbgrader", {}).get("grade")
        ] == [c.source for c in student.cells], name


@needs_nbgrader
def test_nbgrader_gives_the_reference_full_marks_and_a_wrong_answer_loses_its_points(tmp_path):
    write_course(tmp_path, [NOTEBOOK])
    _nbgrader(tmp_path, "generate_assignment", "course")

    source = nbformat.read(tmp_path / "source/course" / f"{NOTEBOOK}.ipynb", as_version=4)
    answers = {
        c.metadata["nbgrader"]["grade_id"]: c.source
        for c in source.cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }
    broken_cell = next(k for k, v in answers.items() if BROKEN in exercises_in(v))
    assert RIGHT in answers[broken_cell]
    _submit(tmp_path, "reference", answers)
    _submit(tmp_path, "wrong", {**answers, broken_cell: answers[broken_cell].replace(RIGHT, WRONG)})
    _nbgrader(tmp_path, "autograde", "course", "--create")
    _nbgrader(tmp_path, "export")

    with open(tmp_path / "grades.csv") as f:
        scores = {row["student_id"]: row for row in csv.DictReader(f)}
    total = sum(worth(name) for cell in answers.values() for name in exercises_in(cell))
    assert float(scores["reference"]["max_score"]) == total
    assert float(scores["reference"]["score"]) == total
    assert float(scores["wrong"]["score"]) == total - worth(BROKEN)
    graded = nbformat.read(tmp_path / "autograded/wrong/course" / f"{NOTEBOOK}.ipynb", as_version=4)
    verdict = next(
        c
        for c in graded.cells
        if c.metadata.get("nbgrader", {}).get("grade_id") == f"test_{BROKEN}"
    )
    assert f"[x] {BROKEN}: not right yet" in verdict.outputs[0]["text"]
