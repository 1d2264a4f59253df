"""One source of truth for exercises: student notebooks are generated from the solved ones.

In `solutions/*.ipynb` a code cell marks the part a student writes:

    def perplexity_from_loss(loss):
        ### BEGIN SOLUTION
        return math.exp(loss)
        ### END SOLUTION

`labkit notebooks` writes `notebooks/*.ipynb` with each marked block replaced by a stub that raises
NotImplementedError at the same indentation. Outputs are stripped from both copies. The exercise's
check function (labkit.checks) catches the error, says so, and hands back labkit's reference
implementation, so an unsolved student notebook still runs end to end.
"""

import copy
from pathlib import Path

import nbformat

from .paths import REPO_ROOT

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("Exercise: replace this line with your code")'
SOLUTIONS_DIR, NOTEBOOKS_DIR = REPO_ROOT / "solutions", REPO_ROOT / "notebooks"


def strip_solutions(source: str) -> str:
    """Replace every BEGIN/END SOLUTION block with an indented NotImplementedError stub."""
    out, inside, indent = [], False, ""
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError("nested '### BEGIN SOLUTION'")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(indent + STUB)
        elif stripped == END:
            if not inside:
                raise ValueError("'### END SOLUTION' without a matching BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("'### BEGIN SOLUTION' without a matching END")
    return "\n".join(out)


# what `make lab`'s Jupyter offers as its default kernel (the venv's own Python): a notebook that names it
# opens without a "Select Kernel" dialog and is not marked modified the moment it opens
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


def clear_outputs(nb) -> None:
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)


def student_version(nb):
    student = copy.deepcopy(nb)
    clear_outputs(student)
    for cell in student.cells:
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source)
    return student


def _dump(nb) -> str:
    return nbformat.writes(nb) + "\n"


def generate(
    solutions_dir: Path = SOLUTIONS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR, check: bool = False
) -> list[str]:
    """Write (or, with check=True, only compare) every student notebook. Returns the stale ones' names."""
    stale = []
    notebooks_dir.mkdir(exist_ok=True)
    for path in sorted(solutions_dir.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        solved = copy.deepcopy(nb)
        clear_outputs(solved)
        target = notebooks_dir / path.name
        wanted = _dump(student_version(nb))
        if _dump(solved) != path.read_text():
            stale.append(f"solutions/{path.name} (has outputs)")
            if not check:
                path.write_text(_dump(solved))
        if not target.exists() or target.read_text() != wanted:
            stale.append(f"notebooks/{path.name}")
            if not check:
                target.write_text(wanted)
    orphans = {p.name for p in notebooks_dir.glob("*.ipynb")} - {
        p.name for p in solutions_dir.glob("*.ipynb")
    }
    stale += [f"notebooks/{name} (no solution)" for name in sorted(orphans)]
    return stale
