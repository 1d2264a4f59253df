import nbformat
import pytest

from labkit import checks
from labkit.exercises import STUB, generate, strip_solutions


def test_solution_block_becomes_an_indented_stub():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    y = x * 2\n    return y\n    ### END SOLUTION\n\nf = check(f)"
    out = strip_solutions(src)
    assert out == f"def f(x):\n    {STUB}\n\nf = check(f)"
    ns = {}
    exec(out.replace("f = check(f)", ""), ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize(
    "bad",
    [
        "### BEGIN SOLUTION\nx",
        "x\n### END SOLUTION",
        "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
    ],
)
def test_unbalanced_markers_are_errors(bad):
    with pytest.raises(ValueError):
        strip_solutions(bad)


def test_student_notebooks_are_up_to_date():
    stale = generate(check=True)
    assert stale == [], f"run `make notebooks` to regenerate: {stale}"


def test_stale_and_orphan_copies_are_detected(tmp_path):
    sol, stu = tmp_path / "solutions", tmp_path / "notebooks"
    sol.mkdir()
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
            )
        ]
    )
    nbformat.write(nb, sol / "01_x.ipynb")
    assert "notebooks/01_x.ipynb" in generate(sol, stu, check=True)
    generate(sol, stu)
    assert generate(sol, stu, check=True) == []
    assert "return 1" not in (stu / "01_x.ipynb").read_text()
    (stu / "99_orphan.ipynb").write_text("{}")
    assert any("orphan" in s for s in generate(sol, stu, check=True))


def test_every_solution_exercise_passes_its_own_check(capsys):
    assert (
        checks.check_perplexity_from_nll(checks.reference_perplexity_from_nll)
        is checks.reference_perplexity_from_nll
    )
    assert "[ok]" in capsys.readouterr().out


def test_unsolved_and_wrong_exercises_fall_back_to_the_reference(capsys):
    def unsolved(nll, n):
        raise NotImplementedError

    assert checks.check_perplexity_from_nll(unsolved) is checks.reference_perplexity_from_nll
    assert "not solved yet" in capsys.readouterr().out

    def wrong(nll, n):
        return nll / n  # forgot the exp

    assert checks.check_perplexity_from_nll(wrong) is checks.reference_perplexity_from_nll
    assert "expected" in capsys.readouterr().out
