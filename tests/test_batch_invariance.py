"""EngineConfig(batch_invariant=True): a sequence's logprobs are bit-identical whatever else is in the
batch (alone, with 1..31 others, with its prompt chunked because others share the token budget), on the
course model and on SmolLM2; and the mode is validated. The normal mode is only close (notebook 05b)."""

import random

import pytest

from labkit import load_model
from labkit.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
WORDS = "the of and to her was she a in not it that be had with as for his you".split()


def others(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 80))) for _ in range(n)]


def traced(model, tok, k: int, **options) -> tuple[list[int], list[list[float]]]:
    """PROMPT's greedy tokens and, per token, its logprob and its top-5 logprobs, run beside k others that
    finish at different steps (so the batch shrinks under it)."""
    engine = LLMEngine(model, tok, max_num_seqs=32, **options)
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=5, ignore_eos=True)
    engine.add_request("p", PROMPT, params)
    for i, text in enumerate(others(k)):
        engine.add_request(str(i), text, SamplingParams(max_tokens=3 + i % 17, ignore_eos=True))
    tokens, logprobs = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "p":
                tokens += out.new_token_ids
                logprobs += [[lp.logprob, *(v for _, v in lp.top)] for lp in out.logprobs or []]
    return tokens, logprobs


@pytest.fixture(scope="module")
def course():
    return load_model(device="cpu")


@pytest.mark.parametrize("k", [1, 2, 7, 31])
def test_course_model_logprobs_bit_identical_alone_and_in_a_batch(course, k):
    alone = traced(*course, 0, batch_invariant=True)
    assert traced(*course, k, batch_invariant=True) == alone


def test_bit_identical_with_the_prompt_chunked_differently(course):
    """max_num_batched_tokens=32: alone the prompt is prefilled in chunks of 32; beside others, the
    budget is shared, so its chunks fall elsewhere."""
    alone = traced(*course, 0, batch_invariant=True, max_num_batched_tokens=32)
    assert traced(*course, 7, batch_invariant=True, max_num_batched_tokens=32) == alone


@pytest.mark.slow
def test_smollm2_logprobs_bit_identical_alone_and_in_a_batch():
    model, tok = load_model("smollm2")
    alone = traced(model, tok, 0, batch_invariant=True)
    for k in (1, 15):
        assert traced(model, tok, k, batch_invariant=True) == alone


def test_batch_invariant_runs_eagerly_and_is_validated(course):
    with pytest.raises(ValueError, match="batch_invariant must be True or False"):
        EngineConfig(batch_invariant=1)
    engine = LLMEngine(*course, batch_invariant=True)
    assert engine.runner.compiled is None  # the batch-1 and the many-row graphs fuse differently
    assert "batch-invariant" in engine.runner.one_row_path
