"""Fast unit tests for labkit.serve pieces that need no server: stop strings across tokens, request
validation, the exercise checks (they must accept the reference and reject wrong answers), the CLI."""

import math

import pytest
from pydantic import ValidationError

from labkit import load_tokenizer
from labkit.serve import checks
from labkit.serve.detokenize import IncrementalDetokenizer
from labkit.serve.protocol import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def stream(tok, text, stop, chunk=1):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop)
    out = []
    for i in range(0, len(ids), chunk):
        out.append(d.push(ids[i : i + chunk], final=i + chunk >= len(ids)))
        if d.stopped:
            break
    return "".join(out), d.stopped


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_detokenizer_reassembles_text(tok, chunk):
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    )
    assert stream(tok, text, None, chunk) == (text, False)


@pytest.mark.parametrize(
    "stop", [[" single man"], ["truth universally"], ["fortune"], [",", "zzz"]]
)
def test_detokenizer_stops_before_multi_token_stop_strings(tok, stop):
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    )
    got, stopped = stream(tok, text, stop)
    cut = min(text.find(s) for s in stop if s in text)
    assert stopped and got == text[:cut]


def test_detokenizer_never_emits_half_characters(tok):
    text = "Café — naïve “quotes”"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i], final=k == len(ids) - 1) for k, i in enumerate(ids)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_request_validation():
    assert CompletionRequest(prompt=["one prompt"]).prompt == "one prompt"
    assert CompletionRequest(prompt=[[1, 2]]).prompt == [1, 2]
    assert CompletionRequest(prompt="x", stop="END").stop == ["END"]
    ok = CompletionRequest(prompt="x", n=2, logprobs=5, echo=True, max_tokens=0)
    assert (ok.n, ok.logprobs, ok.echo, ok.max_tokens) == (2, 5, True, 0)
    for bad in [
        dict(prompt="x", n=0),
        dict(prompt=["a", "b"]),
        dict(prompt="x", temperature=3),
        dict(prompt="x", temperature=1e-300),
        dict(prompt="x", top_p=0),
        dict(prompt="x", top_p=1e-300),
        dict(prompt="x", max_tokens=0),
        dict(prompt="x", max_tokens=True),
        dict(prompt="x", seed=2**64),
        dict(prompt="x", stream="yes"),
        dict(prompt="x", stop=["a"] * 5),
        dict(prompt="x", presence_penalty=1.0),
        dict(prompt="x", logprobs=21),
        dict(prompt="x", best_of=2),
        dict(prompt="x", suffix="y"),
        dict(prompt="\ud800"),
    ]:
        with pytest.raises(ValidationError):
            CompletionRequest(**bad)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    parts = ChatCompletionRequest(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert parts.messages[0].text() == "ab"


def _wrong(*args, **kwargs):
    return 0.0


@pytest.mark.parametrize(
    "check, reference",
    [
        (checks.check_parse_sse, checks.reference_parse_sse),
        (checks.check_latency_summary, checks.reference_latency_summary),
        (checks.check_histogram_quantile, checks.reference_histogram_quantile),
        (checks.check_cost_per_1k_tokens, checks.reference_cost_per_1k_tokens),
        (checks.check_retry_after, checks.reference_retry_after),
    ],
)
def test_exercise_checks(check, reference, capsys):
    assert check(reference) is reference
    assert "[ok]" in capsys.readouterr().out
    assert check(_wrong) is reference
    assert "[x]" in capsys.readouterr().out

    def unsolved(*args):
        raise NotImplementedError

    assert check(unsolved) is reference


def test_histogram_quantile_matches_prometheus_semantics():
    inf = math.inf
    q = checks.reference_histogram_quantile
    # the promtool test case
    assert q(0.95, [(10.0, 0), (30.0, 60), (inf, 60)]) == pytest.approx(29.0)
    assert q(0.99, [(0.1, 10), (0.2, 10), (inf, 20)]) == 0.2  # +Inf bucket -> last bound
    assert math.isnan(q(0.5, [(1.0, 0), (inf, 0)]))


def test_cost_rejects_nonsense():
    with pytest.raises(ValueError):
        checks.reference_cost_per_1k_tokens(1.0, 0.0)
    with pytest.raises(ValueError):
        checks.reference_cost_per_1k_tokens(1.0, 10.0, 1.5)


def test_cli_rejects_bad_limits():
    from labkit.serve.cli import main

    with pytest.raises(SystemExit, match="max-num-seqs"):
        main(["--max-num-seqs", "0"])
    with pytest.raises(SystemExit):
        main(["--dtype", "int3"])
