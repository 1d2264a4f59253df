"""Speculative decoding (labkit/engine/speculative.py): the drafting and acceptance rules on their own,
then the engine with speculation on against the same engine with it off."""

import pytest
import torch

from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.block_manager import BlockManager
from labkit.engine.sequence import Sequence
from labkit.engine.speculative import (
    SpeculativeStats,
    accept_greedy,
    accept_sampled,
    propose_ngram,
)


# ---- drafting -----------------------------------------------------------------------------------------
def test_propose_ngram_copies_what_followed_the_last_ngram():
    #        0  1  2  3  4  5  6  7
    tokens = [5, 6, 7, 8, 9, 1, 6, 7]
    assert propose_ngram(tokens, k=3, max_n=2) == [8, 9, 1]
    assert propose_ngram(tokens, k=10, max_n=2) == [8, 9, 1, 6, 7]  # stops at the sequence's end


def test_propose_ngram_prefers_the_longest_then_the_latest_match():
    # the 1-gram [3] last occurred at 4 (followed by 9); the 2-gram [2, 3] only at 1 (followed by 4)
    tokens = [1, 2, 3, 4, 3, 9, 2, 3]
    assert propose_ngram(tokens, k=1, max_n=2) == [4]
    assert propose_ngram(tokens, k=1, max_n=1) == [9]
    assert propose_ngram(tokens, k=2, max_n=3, min_n=3) == []  # [9, 2, 3] never occurred before


def test_propose_ngram_finds_nothing_without_a_repeat():
    assert propose_ngram([1, 2, 3, 4], k=4, max_n=3) == []
    assert propose_ngram([7], k=4, max_n=3) == []
    assert propose_ngram([], k=4, max_n=3) == []


# ---- acceptance ---------------------------------------------------------------------------------------
def test_accept_greedy_keeps_the_matching_prefix_and_the_models_next_token():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [
        4,
        5,
        6,
        7,
    ]  # all accepted, plus the bonus token
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # the first mismatch ends it
    assert accept_greedy([4, 5, 6], [1, 5, 6, 7]) == [1]  # nothing accepted: a plain decode step
    assert accept_greedy([], [3]) == [3]


def test_accept_sampled_follows_the_rejection_rule():
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert accept_sampled([1, 2], certain) == [1, 2, 0]  # p(x) = 1: always kept, then one from p_k
    # p(x) = 0: always rejected, and the replacement never is x
    impossible = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        out = accept_sampled([1], impossible, gen)
        assert len(out) == 1 and out[0] in (0, 2)


def test_accept_sampled_emits_tokens_distributed_as_p():
    """Whatever the draft, the first emitted token is distributed as p (the point of the rule)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs = torch.stack([p, torch.full((4,), 0.25)])
    gen = torch.Generator().manual_seed(1)
    for draft in (0, 3):
        counts = torch.zeros(4)
        n = 10000
        for _ in range(n):
            counts[accept_sampled([draft], probs, gen)[0]] += 1
        assert (counts / n - p).abs().max() < 0.02, (draft, counts / n)


def test_speculative_stats():
    stats = SpeculativeStats()
    stats.record(num_draft=4, num_accepted=3)
    stats.record(num_draft=2, num_accepted=0)
    assert stats.acceptance_rate == pytest.approx(3 / 6)
    assert stats.mean_tokens_per_step == pytest.approx((4 + 1) / 2)


# ---- rollback in the block manager ----------------------------------------------------------------------
def test_truncate_frees_the_blocks_of_rejected_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", list(range(6)), 6, SamplingParams(), 0)
    bm.allocate(seq)
    seq.token_ids += [10, 11, 12, 13, 14]  # 5 drafted tokens: 11 in all, 3 blocks
    bm.append(seq)
    seq.num_computed_tokens = seq.num_tokens
    assert len(seq.block_table) == 3 and bm.num_used == 3
    del seq.token_ids[7:]  # one draft accepted
    bm.truncate(seq, 7)
    bm.check_invariants([seq])
    assert len(seq.block_table) == 2 and bm.num_used == 2 and seq.num_computed_tokens == 7
    bm.free_seq(seq)
    bm.check_invariants([])
    assert bm.num_used == 0


def test_check_invariants_catches_blocks_left_behind_by_a_rollback():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", list(range(10)), 10, SamplingParams(), 0)
    bm.allocate(seq)
    del seq.token_ids[4:]  # forgot to truncate
    seq.num_computed_tokens = 4
    with pytest.raises(AssertionError, match="past its last token"):
        bm.check_invariants([seq])


def test_config_validates_the_speculative_options():
    with pytest.raises(ValueError, match="speculative_ngram"):
        EngineConfig(speculative_ngram=-1)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=0)
    assert EngineConfig().speculative_ngram == 0  # off by default


# ---- the engine: greedy speculation changes the speed, never the tokens ---------------------------------
def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Step to completion, checking the block invariants after every step; request id -> outputs."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        live = [s for samples in engine.requests.values() for s in samples]
        engine.block_manager.check_invariants(live)
    assert engine.block_manager.num_used == 0
    return tokens, reasons


def repetitive_prompts(tok) -> list[list[int]]:
    texts = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. It is a truth universally acknowledged, that",
        "Mr. Darcy said that Mr. Darcy said that Mr. Darcy",
        "Elizabeth",
        "She was. She was. She was. She",
    ]
    return [tok(t)["input_ids"] for t in texts]


def test_greedy_speculation_matches_plain_decoding_token_for_token(course):
    model, tok = course
    prompts = repetitive_prompts(tok)
    plain_engine = LLMEngine(model, tok, max_num_seqs=8, block_size=4)
    requests = {
        f"r{i}": (p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        for i, (p, m) in enumerate(zip(prompts, (40, 7, 33, 2)))
    }
    plain, _ = run(plain_engine, requests)
    # stop tokens that plain decoding meets mid-output: speculation must stop at the same place,
    # even when the stop token sits in the middle of an accepted draft
    stops = {rid: out[len(out) // 2] for rid, out in plain.items()}
    requests_stop = {
        f"{rid}-stop": (
            p,
            SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stops[rid]]),
        )
        for rid, (p, _) in requests.items()
    }
    plain_stop, plain_reasons = run(plain_engine, requests_stop)
    for k in (1, 4, 7):
        engine = LLMEngine(
            model, tok, max_num_seqs=8, block_size=4, speculative_ngram=3, num_speculative_tokens=k
        )
        assert run(engine, requests)[0] == plain
        assert run(engine, requests_stop) == (plain_stop, plain_reasons)
        stats = engine.stats()
        assert stats.num_accepted_tokens > 0, "the repetitive prompts should get drafts accepted"
        assert stats.num_accepted_tokens <= stats.num_draft_tokens
        assert stats.kv_blocks_used == 0


def test_speculation_keeps_logprobs_and_prefix_caching_right(course):
    model, tok = course
    prompt = repetitive_prompts(tok)[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = []
    for ngram in (0, 3):
        engine = LLMEngine(model, tok, max_num_seqs=2, block_size=4, speculative_ngram=ngram)
        engine.add_request("a", prompt, params)
        steps = []
        while engine.has_unfinished_requests():
            steps += engine.step()
        outs.append(steps)
        # the same prompt again: a prefix-cache hit must return the same tokens
        again, _ = run(engine, {"b": (prompt, params)})
        assert again["b"] == [t for s in steps for t in s.new_token_ids]
    plain, spec = outs
    assert len(spec) < len(plain)  # fewer steps, the same tokens and logprobs
    lp_plain = [lp for s in plain for lp in s.logprobs]
    lp_spec = [lp for s in spec for lp in s.logprobs]
    assert [lp.token_id for lp in lp_plain] == [lp.token_id for lp in lp_spec]
    assert [lp.logprob for lp in lp_spec] == pytest.approx(
        [lp.logprob for lp in lp_plain], abs=1e-3
    )


def test_sampled_speculation_draws_from_the_same_distribution(course):
    """temperature > 0: the second token (the first one that can come from a verified draft) has the same
    distribution with and without speculation; 600 seeded requests per side, top-k 4. (max_tokens 3: a
    draft is never longer than the tokens the request may still produce after this step's own one.)"""
    model, tok = course
    prompt = repetitive_prompts(tok)[3]
    params = [SamplingParams(temperature=0.8, top_k=4, max_tokens=3, seed=s) for s in range(600)]
    second = []
    for ngram in (0, 2):
        engine = LLMEngine(model, tok, max_num_seqs=32, speculative_ngram=ngram, seed=1)
        requests = {f"s{i}": (prompt, p) for i, p in enumerate(params)}
        tokens, _ = run(engine, requests)
        assert all(len(t) == 3 for t in tokens.values())
        second.append(torch.bincount(torch.tensor([t[1] for t in tokens.values()])))
        if ngram:
            assert engine.stats().num_draft_tokens > 0
    plain, spec = second
    size = max(len(plain), len(spec))
    plain = torch.nn.functional.pad(plain, (0, size - len(plain))) / 600
    spec = torch.nn.functional.pad(spec, (0, size - len(spec))) / 600
    total_variation = 0.5 * (plain - spec).abs().sum().item()
    assert total_variation < 0.1, total_variation


@pytest.mark.slow
def test_greedy_speculation_on_smollm2_quotes_identically(smollm2):
    from labkit.engine.workload import grounded_workload

    model, tok = smollm2
    prompt = grounded_workload(tok, n=1)[0]
    params = SamplingParams(temperature=0, max_tokens=48)
    outputs = []
    for ngram in (0, 3):
        engine = LLMEngine(model, tok, max_num_seqs=1, speculative_ngram=ngram)
        outputs.append(run(engine, {"q": (prompt, params)})[0]["q"])
    assert outputs[0] == outputs[1]
    assert engine.stats().draft_acceptance_rate > 0.2  # quoting: most drafts are right
