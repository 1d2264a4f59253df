"""Grade the exercises with nbgrader: labkit writes nbgrader's source notebooks, nbgrader does the rest.

`labkit grading COURSE_DIR 00_setup 05_batching` turns solved notebooks into an nbgrader assignment:

    COURSE_DIR/nbgrader_config.py            (written once; yours after that)
    COURSE_DIR/source/course/00_setup.ipynb  (solutions/00_setup.ipynb with nbgrader's metadata)

In each of them, a cell with a `### BEGIN SOLUTION` block becomes an nbgrader solution cell, and after
it comes one locked test cell per exercise it checks (a `name = check_name(name)` line), worth
POINTS[name]:

    from labkit.grading import grade

    grade("perplexity_from_nll")

The check itself stays in the exercise cell, as in notebooks/: it prints its verdict, keeps it in
labkit.checks.VERDICTS and hands the notebook a working function either way. The test cell reads that
verdict and evaluates to the points earned, which nbgrader's autograder takes as the cell's score
("partial credit"): a wrong or unsolved exercise scores 0 without raising, so a student's notebook still
runs to the end. Then nbgrader's own commands: `generate_assignment` (the student copies),
`autograde`, `export` (mk/grading.mk builds nbgrader in .venv-grading; docs/workshop.md walks through it).

Why labkit keeps its generator (labkit.exercises) instead of letting nbgrader write notebooks/: the
student copies in notebooks/ have no test cells and no nbgrader metadata, so self-study, `make lab` and
CI need no gradebook, and a course that never grades never sees nbgrader. The markers are the same and
nbgrader is configured with labkit's stub, so nbgrader's student copies are notebooks/ plus the test
cells (tests/test_grading.py compares them).
"""

import copy
import re
from pathlib import Path

import nbformat

from .checks import VERDICTS
from .exercises import BEGIN, SOLUTIONS_DIR, STUB, clear_outputs

# every exercise is worth 1 point, except those with several steps to get right
POINTS = {"gptq_columns": 2, "awq_search": 2, "schedule": 3, "allocate_blocks": 2}
SCHEMA_VERSION = 3  # nbgrader's cell metadata schema (nbgrader 0.9)
# the kernel nbgrader runs notebooks in: the course's venv, registered by mk/grading.mk under this name
KERNEL_NAME = "labkit-course"
CHECK_LINE = re.compile(r"^(\w+) = check_(\w+)\(", re.MULTILINE)

CONFIG = f"""\
# nbgrader's settings for the labkit course, written by `labkit grading` (edit freely; it is not rewritten)
c = get_config()  # nbgrader provides get_config
c.CourseDirectory.course_id = "labkit"
# nbgrader clears solutions with labkit's stub, so its student copies match notebooks/
c.ClearSolutions.code_stub = {{"python": {STUB!r}}}
# run every notebook in the course's venv (a kernel spec that `make grading` registers), not nbgrader's own
c.Execute.kernel_name = {KERNEL_NAME!r}
# the course's slowest cells take a minute or more on 2 cores; nbgrader's default is 30 s a cell
c.Execute.timeout = 600
"""


class NotGradable(RuntimeError):
    """The exercise's check never ran in this kernel, so there is no verdict to score."""


def worth(name: str) -> int:
    return POINTS.get(name, 1)


def grade(name: str) -> int:
    """The points `name` earned by its check's latest verdict in this kernel (nbgrader's test cell value)."""
    verdict = VERDICTS.get(name)
    if verdict is None:
        raise NotGradable(
            f"{name} is not gradable here: its check did not run in this kernel. Run the exercise cell "
            f"above first. If that cell stops with an error from the answer, 0 points is the grade; if it "
            f"stops because this machine cannot run that part (no GPU, a missing venv or tool), grade it "
            f"on a machine that can, or by hand."
        )
    earned = worth(name) if verdict.passed else 0
    print(f"{earned} of {worth(name)} point(s): {verdict.message.splitlines()[0]}")
    return earned


def exercises_in(source: str) -> list[str]:
    """The exercises a cell checks: `name = check_name(...)` lines, in order."""
    return [name for name, checked in CHECK_LINE.findall(source) if name == checked]


def _nbgrader(grade_id: str, *, solution: bool, points: int | None = None) -> dict:
    meta = {
        "grade": points is not None,
        "grade_id": grade_id,
        "locked": not solution,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if points is not None:
        meta["points"] = points
    return meta


def grade_cell(name: str):
    cell = nbformat.v4.new_code_cell(f'from labkit.grading import grade\n\ngrade("{name}")')
    cell.metadata["nbgrader"] = _nbgrader(f"test_{name}", solution=False, points=worth(name))
    return cell


def nbgrader_source(solved, where: str = "notebook"):
    """A solved notebook as nbgrader's source: solution cells marked, a test cell after each check."""
    nb = copy.deepcopy(solved)
    clear_outputs(nb)
    cells = []
    for i, cell in enumerate(nb.cells):
        cells.append(cell)
        if cell.cell_type != "code" or BEGIN not in cell.source:
            continue
        names = exercises_in(cell.source)
        if not names:
            raise ValueError(
                f"{where}, cell {i}: a solution block but no `name = check_name(name)` line; "
                f"nbgrader can only score an exercise that labkit checks"
            )
        cell.metadata["nbgrader"] = _nbgrader("answer_" + "_".join(names), solution=True)
        cells += [grade_cell(name) for name in names]
    nb.cells = cells
    return nb


def write_course(
    course_dir: Path,
    notebooks: list[str],
    assignment: str = "course",
    solutions_dir: Path = SOLUTIONS_DIR,
) -> list[Path]:
    """Write nbgrader's source for `assignment` (and nbgrader_config.py if missing); the paths written."""
    paths = [solutions_dir / f"{Path(name).stem}.ipynb" for name in notebooks]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        known = ", ".join(sorted(p.stem for p in solutions_dir.glob("*.ipynb")))
        raise FileNotFoundError(f"no solutions/{missing}; the notebooks are: {known}")
    source = course_dir / "source" / assignment
    source.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        nb = nbgrader_source(nbformat.read(path, as_version=4), where=f"solutions/{path.name}")
        nbformat.write(nb, source / path.name)
        written.append(source / path.name)
    config = course_dir / "nbgrader_config.py"
    if not config.exists():
        config.write_text(CONFIG)
        written.append(config)
    return written
