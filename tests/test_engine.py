"""labkit.engine: cached decoding == uncached == transformers; batched == unbatched; API contract."""

import pytest
import torch

from labkit import load_model
from labkit.engine import LLM, LLMEngine, SamplingParams
from labkit.engine.baselines import generate_no_cache, static_batch_generate

PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy",
    "She was",
    "The next morning, Elizabeth walked",
]


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return load_model(device="cpu")


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_cached_equals_uncached_equals_transformers(model_tok):
    model, tok = model_tok
    llm = LLM(model, tokenizer=tok, block_size=4)  # small blocks: many block boundaries crossed
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(model, tok, prompt, 24)
        assert out.outputs[0].token_ids == generate_no_cache(model, ids, 24)
        assert out.outputs[0].finish_reason == "length"


def test_batched_equals_unbatched_and_chunked_prefill(model_tok):
    model, tok = model_tok
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [
        LLM(model, tokenizer=tok).generate([p], params)[0].outputs[0].token_ids for p in PROMPTS
    ]
    # 6-token budget: prompts are split over several steps and mixed with other requests' decodes
    batched = LLM(model, tokenizer=tok, max_num_batched_tokens=6, block_size=8).generate(
        PROMPTS, params
    )
    assert [o.outputs[0].token_ids for o in batched] == alone
    static = static_batch_generate(model, tok, PROMPTS, max_new_tokens=16)
    assert static == alone


def test_seeded_sampling_is_reproducible_regardless_of_batch(model_tok):
    model, tok = model_tok
    p = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=40, max_tokens=20, seed=123, ignore_eos=True
    )
    alone = LLM(model, tokenizer=tok).generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    mixed = LLM(model, tokenizer=tok).generate(
        PROMPTS, [p] + [SamplingParams(temperature=1.0, max_tokens=12)] * 3
    )
    assert mixed[0].outputs[0].token_ids == alone
    other = LLM(model, tokenizer=tok).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.9, max_tokens=20, seed=7, ignore_eos=True)
    )
    # different seed, different sample (overwhelmingly likely)
    assert other[0].outputs[0].token_ids != alone


def test_preemption_recomputes_and_gives_same_tokens(model_tok):
    model, tok = model_tok
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model, tokenizer=tok).generate(PROMPTS, params)
    tight = LLM(model, tokenizer=tok, block_size=4, num_blocks=24, enable_prefix_caching=False)
    outs = tight.generate(PROMPTS, params)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.stats().kv_blocks_used == 0


def test_prefix_cache_hits_and_same_tokens(model_tok):
    model, tok = model_tok
    shared = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    prompts = [shared + " in want of a wife.", shared + " happy.", shared + " rich."]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, tokenizer=tok, block_size=4)
    first = llm.generate(prompts[:1], params)
    cached = llm.generate(prompts, params)
    assert llm.engine.stats().prefix_cache_hit_rate > 0.5
    plain = LLM(model, tokenizer=tok, block_size=4, enable_prefix_caching=False).generate(
        prompts, params
    )
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in plain]
    assert cached[0].outputs[0].token_ids == first[0].outputs[0].token_ids


def test_step_outputs_stop_and_abort(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, max_num_seqs=2)
    greedy = LLM(model, tokenizer=tok).generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10)
    )[0]
    stop_at = greedy.outputs[0].token_ids[3]
    engine.add_request(
        "a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at])
    )
    engine.add_request(
        "b", PROMPTS[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    )
    engine.add_request(
        "c", PROMPTS[2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "x", SamplingParams())
    got: dict[str, list] = {}
    first = engine.step()
    assert {o.request_id for o in first} == {"a", "b"}  # max_num_seqs=2: "c" waits (FIFO)
    assert engine.stats().num_waiting == 1 and engine.stats().num_running == 2
    for o in first:
        got.setdefault(o.request_id, []).append(o)
    while engine.has_unfinished_requests():
        outs = engine.step()
        for o in outs:
            got.setdefault(o.request_id, []).append(o)
        if "a" in got and got["a"][-1].finished and "b" in engine.requests:
            engine.abort_request("b")
            engine.abort_request("no-such-id")  # no-op
    a = got["a"]
    assert [o.new_token_ids[0] for o in a] == greedy.outputs[0].token_ids[:4]
    assert a[-1].finished and a[-1].finish_reason == "stop" and a[-1].num_output_tokens == 4
    assert got["b"][-1].finish_reason == "abort" and got["b"][-1].num_output_tokens < 50
    assert got["c"][-1].finish_reason == "length" and got["c"][-1].num_output_tokens == 5
    assert all(not o.finished for o in a[:-1])
    assert engine.stats().kv_blocks_used == 0 and engine.stats().kv_usage == 0.0


def test_stop_strings_are_cut_from_text(model_tok):
    model, tok = model_tok
    full = LLM(model, tokenizer=tok).generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30)
    )[0]
    text = full.outputs[0].text
    word = text.split()[2]
    out = LLM(model, tokenizer=tok).generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop=[word])
    )[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == text[: text.find(word)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(stop_token_ids=[-1]),
        dict(stop=[""]),
        dict(seed="x"),
    ],
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_add_request_validation(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_blocks=8, block_size=16)
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [5] * (context - 3), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="KV cache"):
        # 8 blocks x 16 = 128 slots
        engine.add_request("big", [5] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError):
        LLMEngine(model, tok, block_size=0)
    assert not engine.has_unfinished_requests()


def test_top_k_one_and_tiny_top_p_are_greedy(model_tok):
    model, tok = model_tok
    greedy = LLM(model, tokenizer=tok).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        outs = LLM(model, tokenizer=tok).generate(
            PROMPTS, SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, **kw)
        )
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in greedy]
