"""labkit.numerics: comparing two traces of one request, as vLLM's tests do."""

from labkit.numerics import Trace, compare, logprobs_close, margin


def trace(tokens, tops):
    return Trace(tokens, [dict(t) for t in tops])


A = trace([5, 7, 9], [{5: -0.1, 6: -2.5}, {7: -0.70, 8: -0.71}, {9: -0.2, 1: -3.0}])


def test_identical_traces_are_close_and_never_diverge():
    d = compare(A, A)
    assert d.max_logprob_gap == 0 and d.first_divergence is None and d.margins is None
    assert logprobs_close(A, A)


def test_a_near_tie_flip_is_close_and_its_margin_is_reported():
    b = trace([5, 8, 2], [{5: -0.1000001, 6: -2.5}, {8: -0.699, 7: -0.700}, {2: -0.1, 9: -4.0}])
    d = compare(A, b)
    assert d.first_divergence == 1
    assert abs(d.max_logprob_gap - 1e-7) < 1e-9  # measured over the shared prefix only
    assert abs(d.margins[0] - 0.01) < 1e-9 and abs(d.margins[1] - 0.001) < 1e-9
    assert logprobs_close(A, b)  # the later tokens (9 vs 2) are not compared: different contexts


def test_a_flip_to_a_token_outside_the_top_candidates_is_not_close():
    b = trace([5, 3, 9], [{5: -0.1, 6: -2.5}, {3: -0.1, 7: -3.0}, {9: -0.2, 1: -3.0}])
    assert not logprobs_close(A, b)  # 3 is not among A's candidates at step 1
    assert not logprobs_close(A, trace([5, 7], A.top[:2]))  # a different length with no difference


def test_margin():
    assert margin({1: -0.5, 2: -1.5, 3: -4.0}) == 1.0 and margin({1: -0.5}) == float("inf")
