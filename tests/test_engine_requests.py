"""labkit.engine's request contract (notes: engine_api.md): EngineConfig, SamplingParams validation, one
failing request never takes the others down, logprobs and prompt logprobs equal the model's, and n > 1
samples share the prompt's KV blocks."""

import math

import pytest
import torch

from labkit import load_model
from labkit.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from labkit.engine import outputs as outputs_module
from labkit.engine.sampling import MAX_LOGPROBS, MAX_N

PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "She was"]


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return load_model(device="cpu")


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---- EngineConfig ------------------------------------------------------------------------------------
def test_engine_config_validates_and_the_keyword_form_builds_the_same(model_tok):
    model, tok = model_tok
    assert EngineConfig.build(None, max_num_seqs=8) == EngineConfig(max_num_seqs=8)
    assert EngineConfig.build(EngineConfig(block_size=8), seed=3) == EngineConfig(
        block_size=8, seed=3
    )
    for bad in (
        dict(max_num_seqs=0),
        dict(block_size=True),
        dict(num_blocks=2.0),
        dict(seed=2**64),
    ):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            EngineConfig(**bad)
    with pytest.raises(TypeError, match="max_num_seqs"):  # a typo lists the real names
        EngineConfig.build(None, max_seqs=4)
    old_style = LLMEngine(model, tok, max_num_seqs=3, block_size=8, num_blocks=20)
    new_style = LLMEngine(model, tok, EngineConfig(max_num_seqs=3, block_size=8, num_blocks=20))
    for engine in (old_style, new_style):
        assert engine.config == EngineConfig(max_num_seqs=3, block_size=8, num_blocks=20)
        assert engine.scheduler.max_num_seqs == 3 and engine.block_manager.num_blocks == 20
    llm = LLM(model, tok, EngineConfig(max_num_seqs=2), max_num_batched_tokens=64)
    assert llm.engine.config == EngineConfig(max_num_seqs=2, max_num_batched_tokens=64)


# ---- SamplingParams validation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [
        ("top_p", 1e-300),  # 0 in float32: the request that used to kill the engine
        ("top_p", float("nan")),
        ("top_p", True),
        ("temperature", 1e-300),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("temperature", 1e39),  # inf in float32
        ("temperature", False),
        ("top_k", 2**63),
        ("top_k", True),
        ("seed", 2**63),
        ("seed", True),
        ("max_tokens", 2**63),
        ("max_tokens", 1.0),
        ("max_tokens", 0),  # 0 only for a scoring-only request (prompt_logprobs set)
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", -1),
        ("logprobs", True),
        ("prompt_logprobs", 21),
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", True),
        ("stop_token_ids", [True]),
        ("ignore_eos", 1),
    ],
)
def test_sampling_params_refuse_values_the_sampler_cannot_use(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_sampling_params_accept_the_edges():
    SamplingParams(top_p=1e-30, temperature=1e-30, seed=2**63 - 1, logprobs=0, n=MAX_N)
    SamplingParams(max_tokens=0, prompt_logprobs=0)
    assert SamplingParams(top_k=-1).top_k == 0


# ---- isolation ---------------------------------------------------------------------------------------
def test_tiny_temperature_and_top_p_sample_like_greedy(model_tok):
    model, tok = model_tok
    want = LLM(model, tok).generate(PROMPTS, greedy(8))
    got = LLM(model, tok).generate(
        PROMPTS, SamplingParams(temperature=1e-30, top_p=1e-30, max_tokens=8, ignore_eos=True)
    )
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_a_request_that_fails_in_step_finishes_with_an_error_and_the_others_continue(
    model_tok, monkeypatch
):
    model, tok = model_tok
    alone = LLM(model, tok).generate(PROMPTS, greedy(6))
    real_sample = outputs_module.sample

    def sample_failing_for_seed_666(logits, params, generators, default=None):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("/secret/path: probability tensor contains nan")
        return real_sample(logits, params, generators, default)

    monkeypatch.setattr(outputs_module, "sample", sample_failing_for_seed_666)
    engine = LLMEngine(model, tok)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(6))
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=6, seed=666, n=2))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
    for index in (0, 1):  # both samples of the failing request end, with a client-safe message
        (bad,) = outs["bad", index]
        assert bad.finished and bad.finish_reason == "error" and bad.new_token_ids == []
        assert "sampling" in bad.error and "/secret" not in bad.error
    for i, want in enumerate(alone):
        assert [t for o in outs[str(i), 0] for t in o.new_token_ids] == want.outputs[0].token_ids
    assert engine.stats().kv_blocks_used == 0
    engine.add_request("after", PROMPTS[1], greedy(3))  # the engine still serves
    assert engine.run_to_completion()["after"] == alone[1].outputs[0].token_ids[:3]


def test_a_failure_while_scoring_a_prompt_is_isolated_too(model_tok, monkeypatch):
    model, tok = model_tok
    real = outputs_module.token_logprobs

    def failing_for_top_5(logits, token_ids, k):
        if k == 5:
            raise ValueError("boom")
        return real(logits, token_ids, k)

    monkeypatch.setattr(outputs_module, "token_logprobs", failing_for_top_5)
    engine = LLMEngine(model, tok, max_num_batched_tokens=4)  # the prompts take several chunks
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=3, prompt_logprobs=5))
    engine.add_request("good", PROMPTS[0], greedy(3, prompt_logprobs=1))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert [o.finish_reason for o in outs["bad"]] == ["error"] and "prompt" in outs["bad"][0].error
    assert outs["good"][-1].finish_reason == "length" and len(outs["good"]) == 3
    assert len(outs["good"][0].prompt_logprobs) == len(tok(PROMPTS[0])["input_ids"])
    assert engine.stats().kv_blocks_used == 0


# ---- logprobs ----------------------------------------------------------------------------------------
def hf_logprobs(model, ids):
    """log_softmax of one transformers forward pass over ids: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_prompt_logprobs_equal_a_transformers_forward_with_chunked_prefill_and_cache_hits(
    model_tok,
):
    model, tok = model_tok
    prompt = PROMPTS[0] + ", that a single man in possession of a good fortune"
    ids = tok(prompt)["input_ids"]
    ref = hf_logprobs(model, ids)
    # 5-token steps chunk the prompt; block_size 4 and a first run of the same prompt make cache hits
    llm = LLM(model, tok, block_size=4, max_num_batched_tokens=5)
    llm.generate([prompt], greedy(2))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    out = llm.generate([prompt, prompt], [params, greedy(2)])
    assert llm.engine.stats().prefix_cache_hit_rate > 0  # the plain request next to it did hit
    for o in out[:1]:
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(ids)
        for i, lp in enumerate(o.prompt_logprobs[1:], start=1):
            assert lp.token_id == ids[i]
            assert math.isclose(lp.logprob, ref[i - 1, ids[i]].item(), abs_tol=1e-4)
            top = ref[i - 1].topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_sampled_token_logprobs_equal_the_models(model_tok):
    model, tok = model_tok
    out = LLM(model, tok).generate(
        PROMPTS[:2], SamplingParams(temperature=0.8, seed=1, max_tokens=6, logprobs=2)
    )
    for prompt, o in zip(PROMPTS, out):
        c = o.outputs[0]
        ids = tok(prompt)["input_ids"]
        ref = hf_logprobs(model, ids + c.token_ids)
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
        for j, lp in enumerate(c.logprobs):
            row = ref[len(ids) + j - 1]
            assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
            assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))


def test_a_scoring_only_request_returns_prompt_logprobs_and_no_tokens(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, max_num_batched_tokens=4)
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
    outs = [o for _ in range(20) for o in engine.step()]
    (o,) = outs
    assert o.finished and o.finish_reason == "length" and o.new_token_ids == []
    ids = tok(PROMPTS[0])["input_ids"]
    ref = hf_logprobs(model, ids)
    assert [lp.top for lp in o.prompt_logprobs[1:]] == [[]] * (len(ids) - 1)
    got = [lp.logprob for lp in o.prompt_logprobs[1:]]
    assert got == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0


# ---- n > 1 -------------------------------------------------------------------------------------------
def test_n_samples_share_the_prompt_blocks_and_free_them_all(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4)
    ids = tok(PROMPTS[0])["input_ids"]
    assert len(ids) % 4, "the test wants a partial last prompt block"
    engine.add_request("r", ids, greedy(8, n=3))
    engine.step()  # prefill, then the fork
    samples = engine.requests["r"]
    assert [s.index for s in samples] == [0, 1, 2]
    table = samples[0].block_table
    assert all(s.block_table == table for s in samples)  # the same physical blocks
    assert [engine.block_manager.ref_count[b] for b in table] == [3] * len(table)
    engine.step()  # each writes its next token into the shared partial block: copy-on-write
    assert len({s.block_table[-1] for s in samples}) == 3
    assert all(s.block_table[:-1] == table[:-1] for s in samples)
    engine.block_manager.check_invariants(engine.scheduler.running)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.index, []).extend(o.new_token_ids)
    assert outs[0] == outs[1] == outs[2]  # greedy: n identical samples
    assert engine.stats().kv_blocks_used == 0


def test_llm_generate_returns_n_reproducible_samples_like_vllm(model_tok):
    model, tok = model_tok
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=3, seed=11)
    first = LLM(model, tok).generate(PROMPTS[:2], params)
    again = LLM(model, tok).generate(PROMPTS[:2] + PROMPTS[2:], [params, params, greedy(4)])
    for a, b in zip(first, again):
        assert [c.index for c in a.outputs] == [0, 1, 2]
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # different samples
    roomy = LLM(model, tok).generate(PROMPTS, greedy(12, n=2))
    tight = LLM(model, tok, block_size=4, num_blocks=14, max_num_seqs=4)  # forces preemption
    outs = tight.generate(PROMPTS, greedy(12, n=2))
    assert tight.engine.stats().num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in outs] == [
        [c.token_ids for c in o.outputs] for o in roomy
    ]
    assert tight.engine.stats().kv_blocks_used == 0
