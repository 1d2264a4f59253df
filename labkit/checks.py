"""Check a student's exercise, say clearly what is wrong, and hand back something that works.

Every `check_*` function takes the student's function and returns the function the rest of the
notebook should use: the student's own if it is right, otherwise labkit's reference implementation.
It never raises, so an unsolved notebook still runs to the end (and CI can execute student copies).
The same checks run in tests/ against the reference code, so they cannot drift from it.
Each verdict is also kept in VERDICTS, where labkit.grading's test cells read it for nbgrader.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass


class ExerciseFailure(AssertionError):
    pass


@dataclass(frozen=True)
class Verdict:
    passed: bool
    message: str  # the line the check printed


# the latest verdict of each exercise checked in this Python process (this kernel), by exercise name
VERDICTS: dict[str, Verdict] = {}


def _record(name: str, passed: bool, message: str) -> None:
    VERDICTS[name] = Verdict(passed, message)
    print(message)


def run_check(
    name: str, student: Callable, reference: Callable, test: Callable[[Callable], None]
) -> Callable:
    """Run `test(student)`; print a verdict; return student if it passed, else reference."""
    try:
        test(student)
    except NotImplementedError:
        _record(
            name,
            False,
            f"[ ] {name}: not solved yet - using labkit's reference implementation so the notebook can go on.",
        )
        return reference
    except Exception as err:  # a wrong answer or a crash are both feedback for the student
        _record(
            name,
            False,
            f"[x] {name}: not right yet - {type(err).__name__}: {err}\n"
            f"    Using labkit's reference implementation for the rest of the notebook.",
        )
        return reference
    _record(name, True, f"[ok] {name}: correct!")
    return student


def expect_close(got, want, what: str, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    if got is None:
        raise ExerciseFailure(f"{what}: your function returned None (did you forget `return`?)")
    if not math.isclose(float(got), float(want), rel_tol=rel, abs_tol=abs_):
        raise ExerciseFailure(f"{what}: expected {want:.6g}, got {float(got):.6g}")


# ---- notebook 00 -----------------------------------------------------------------------------


def reference_perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / n_tokens)


def check_perplexity_from_nll(student: Callable) -> Callable:
    def test(fn):
        for nll, n in [(0.0, 10), (10 * math.log(8192), 10), (123.4, 50)]:
            expect_close(
                fn(nll, n),
                reference_perplexity_from_nll(nll, n),
                f"perplexity_from_nll({nll:.1f}, {n})",
            )

    return run_check("perplexity_from_nll", student, reference_perplexity_from_nll, test)
