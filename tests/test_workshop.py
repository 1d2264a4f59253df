"""docs/workshop.md, the instructors' guide: what it derives from the code must still be true."""

import re

from workshop_mistakes import GUIDE, section, table

from labkit.exercises import SOLUTIONS_DIR


def _digits_masked(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text)


def test_the_mistakes_table_is_what_the_checks_say():
    assert _digits_masked(section(GUIDE.read_text())) == _digits_masked(table()), (
        "the checks changed: run `.venv/bin/python tests/workshop_mistakes.py` to rewrite the table"
    )


def test_every_notebook_has_a_row_in_the_durations_table():
    durations = GUIDE.read_text().split("## How long each notebook takes")[1].split("\n## ")[0]
    missing = [p.stem for p in SOLUTIONS_DIR.glob("*.ipynb") if f"| {p.stem} |" not in durations]
    assert not missing, f"docs/workshop.md has no duration for {missing}"
