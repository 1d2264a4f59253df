"""Batching at equal KV memory (labkit.engine.kv_budget): the two policies compute the same tokens, the
static batches respect their reservations, and paging admits more sequences into the same budget."""

import pytest

from labkit.data import heldout_ids
from labkit.engine.kv_budget import (
    SHAREGPT_MEAN_INPUT,
    SHAREGPT_MEAN_OUTPUT,
    Request,
    build_workload,
    ceilings,
    prompt_backlog,
    run_continuous_paged,
    run_static_contiguous,
    sharegpt_like_lengths,
    static_contiguous_batches,
)


def test_lengths_follow_the_scaled_sharegpt_means_and_the_caps():
    pairs = sharegpt_like_lengths(2000, scale=0.25, max_tokens=200, context=1024, seed=1)
    ins, outs = [i for i, _ in pairs], [o for _, o in pairs]
    assert max(outs) <= 200 and max(i + 200 for i in ins) <= 1024 and min(ins + outs) >= 1
    # log-normal with the paper's means times 0.25 (the output cap trims the tail a little)
    assert abs(sum(ins) / len(ins) - SHAREGPT_MEAN_INPUT * 0.25) < 0.1 * SHAREGPT_MEAN_INPUT * 0.25
    assert 0.8 * SHAREGPT_MEAN_OUTPUT * 0.25 < sum(outs) / len(outs) <= SHAREGPT_MEAN_OUTPUT * 0.25
    assert pairs == sharegpt_like_lengths(2000, scale=0.25, max_tokens=200, context=1024, seed=1)


def test_static_batches_keep_their_reservations_within_the_budget_in_arrival_order():
    workload = [Request([0] * n, 5) for n in (10, 30, 50, 5, 70, 20)]
    batches = static_contiguous_batches(workload, max_tokens=40, budget_tokens=128)
    assert [i for b in batches for i in b] == list(range(6))
    for b in batches:
        assert sum(len(workload[i].prompt_ids) + 40 for i in b) <= 128
    assert batches == [[0, 1], [2], [3], [4], [5]]  # 50+40 and 5+40 no longer fit in 128
    with pytest.raises(ValueError, match="more than the whole budget"):
        static_contiguous_batches([Request([0] * 100, 5)], max_tokens=40, budget_tokens=128)


@pytest.mark.slow
def test_both_policies_give_the_same_greedy_tokens_and_paging_runs_bigger_batches(course):
    model, tok = course
    # more requests than the budget holds at once, and a max_tokens cap well above the mean answer
    max_tokens, budget = 64, 320
    lengths = sharegpt_like_lengths(16, scale=0.08, max_tokens=max_tokens, context=512, seed=0)
    workload = build_workload(heldout_ids(tok, 4096), lengths)
    static = run_static_contiguous(model, tok, workload, max_tokens, budget)
    paged = run_continuous_paged(model, tok, workload, budget)
    assert static.token_ids == paged.token_ids
    assert [len(t) for t in paged.token_ids] == [r.output_len for r in workload]
    # paging holds more running sequences in the same memory, and fills more of it with real tokens
    assert paged.summary()["batch_size_max"] > static.summary()["batch_size_max"]
    assert max(paged.kv_utilisation) <= 1.0 and max(static.reserved_utilisation) <= 1.0
    assert paged.summary()["kv_utilisation_max"] > static.summary()["kv_utilisation_max"]
    c = ceilings(workload, max_tokens, budget)
    assert c["static_padded_work"] >= 1 and c["reservation_overhead"] > 1
    assert static.decode_steps >= c["static_decode_steps_if_padded"]
    # every static batch starts with its prompts; the time is split between prompt and pure decode steps
    for run in (static, paged):
        assert 0 < run.pure_decode_steps < run.decode_steps
        assert run.prefill_s > 0 and run.decode_s > 0
    assert static.decode_steps - static.pure_decode_steps >= c["static_batches"]


def test_the_prompt_backlog_falls_only_in_steps_that_feed_prompt_tokens(course):
    from labkit.engine import LLMEngine, SamplingParams

    model, tok = course
    engine = LLMEngine(model, tok, max_num_seqs=2, max_num_batched_tokens=8, enforce_eager=True)
    engine.add_request("a", list(range(5, 15)), SamplingParams(temperature=0, max_tokens=3))
    assert prompt_backlog(engine) == 9  # 10 prompt tokens; the last is fed like a decode token
    engine.step()  # a chunk of 8 prompt tokens
    assert prompt_backlog(engine) == 1
    engine.step()  # the last 2: the prompt is done, a token sampled
    assert prompt_backlog(engine) == 0
    engine.step()  # a decode step
    assert prompt_backlog(engine) == 0
