"""Structured outputs in the engine (labkit/engine/structured.py): the mask allows exactly what the grammar
allows, and every constrained output parses and validates, through batching, n > 1, preemption, the
compiled decode step and speculative decoding; an output cut by max_tokens says "length"."""

import json
import random

import jsonschema
import pytest
import torch

from labkit.engine import LLM, SamplingParams, StructuredOutputsParams
from labkit.engine.structured import (
    GrammarCache,
    allowed_tokens,
    apply_token_bitmask,
    fill_bitmask,
    grammar_error,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Describe a person who lives in Paris as JSON.",
    "Invent a character for a novel. Answer in JSON.",
    "Who is the oldest person you know? JSON please.",
    "Give me a random person record.",
]


def chat(tok, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def schema(spec=PERSON) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=spec)


@pytest.fixture(scope="module")
def llm(smollm2):
    model, tok = smollm2
    return LLM(model, tokenizer=tok, enforce_eager=True)


def test_the_unpacked_bitmask_is_bit_t_mod_32_of_word_t_div_32():
    bitmask = torch.tensor([[0b101, -1], [0, -(2**31)]], dtype=torch.int32)  # -2**31: bit 31 alone
    allowed = allowed_tokens(bitmask, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2] + list(range(32, 64))
    assert allowed[1].nonzero().flatten().tolist() == [63]
    logits = torch.zeros(2, 64)
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits.isfinite(), allowed)


def test_the_mask_allows_exactly_the_tokens_the_grammar_accepts(smollm2):
    """After a prefix of a valid answer: every allowed token is accepted by a copy of the matcher, and
    no disallowed one is (checked on a random sample of each)."""
    model, tok = smollm2
    grammars = GrammarCache(tok, model.config.vocab_size)
    matcher = grammars.matcher(schema())
    for t in tok.encode('{"name":"Ada","ag'):
        assert matcher.consume_token(t)
    allowed = allowed_tokens(fill_bitmask([matcher], model.config.vocab_size), 49152)[0]
    ids = allowed.nonzero().flatten().tolist()
    assert 0 < len(ids) < 100, "only the rest of the key 'age' can follow"
    banned = (~allowed).nonzero().flatten().tolist()
    rng = random.Random(0)
    for t in ids[:50]:
        assert matcher.deep_copy().consume_token(t), tok.decode([t])
    for t in rng.sample(banned, 300):
        assert not matcher.deep_copy().consume_token(t), tok.decode([t])


def test_every_sampled_output_parses_and_validates(llm, smollm2):
    _, tok = smollm2
    params = SamplingParams(temperature=0.8, max_tokens=60, seed=1, structured_outputs=schema())
    outs = llm.generate([chat(tok, q) for q in QUESTIONS * 2], params)
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)


def test_n_samples_each_follow_the_grammar_with_their_own_matcher(llm, smollm2):
    _, tok = smollm2
    params = SamplingParams(
        n=4, temperature=1.0, max_tokens=60, seed=3, structured_outputs=schema()
    )
    out = llm.generate([chat(tok, QUESTIONS[1])], params)[0]
    texts = [o.text for o in out.outputs]
    assert len(set(texts)) > 1, "samples should differ"
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_preemption_and_recompute_keep_the_matcher_and_the_tokens(smollm2):
    model, tok = smollm2
    params = SamplingParams(temperature=0, max_tokens=50, structured_outputs=schema())
    prompts = [chat(tok, q) for q in QUESTIONS]
    roomy = LLM(model, tokenizer=tok, enforce_eager=True).generate(prompts, params)
    tight = LLM(
        model, tokenizer=tok, enforce_eager=True, block_size=4, enable_prefix_caching=False,
        num_blocks=sum(len(p) for p in prompts) // 4 + 12,
    )  # fmt: skip
    outs = tight.generate(prompts, params)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in roomy]
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


def test_the_compiled_decode_step_is_masked_too(smollm2):
    model, tok = smollm2
    params = SamplingParams(temperature=0, max_tokens=16, structured_outputs=schema())
    prompts = [chat(tok, q) for q in QUESTIONS[:2]]
    eager = LLM(model, tokenizer=tok, enforce_eager=True).generate(prompts, params)
    compiled = LLM(model, tokenizer=tok, max_num_seqs=2, compile_after_steps=1)
    outs = compiled.generate(prompts, params)
    assert compiled.engine.runner.compiled.graphs, "the decode step should have compiled"
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in eager]


def test_speculative_decoding_leaves_constrained_requests_to_decode_alone(smollm2):
    model, tok = smollm2
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs=schema())
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(model, tokenizer=tok, enforce_eager=True, speculative_ngram=2)
    outs = llm.generate([chat(tok, QUESTIONS[0])] * 2, [constrained, free])
    jsonschema.validate(json.loads(outs[0].outputs[0].text), PERSON)
    assert llm.engine.stats().num_draft_tokens > 0  # the free one still drafts


def test_a_cut_by_max_tokens_finishes_with_length_not_stop(llm, smollm2):
    _, tok = smollm2
    params = SamplingParams(temperature=0, max_tokens=5, structured_outputs=schema())
    out = llm.generate([chat(tok, QUESTIONS[0])], params)[0].outputs[0]
    assert out.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_choice_regex_and_json_object(llm, smollm2):
    _, tok = smollm2
    question = chat(tok, "Is the sky blue? Answer yes or no.")
    specs = [
        StructuredOutputsParams(choice=["yes", "no", "maybe"]),
        StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"),
        StructuredOutputsParams(json_object=True),
    ]
    outs = llm.generate(
        [question] * 3, [SamplingParams(max_tokens=40, seed=0, structured_outputs=s) for s in specs]
    )
    choice, phone, obj = (o.outputs[0] for o in outs)
    assert choice.text in {"yes", "no", "maybe"} and choice.finish_reason == "stop"
    assert phone.finish_reason == "stop" and len(phone.text) == 8 and phone.text[3] == "-"
    assert isinstance(json.loads(obj.text), dict)


def test_grammars_are_compiled_once_per_schema_whatever_the_key_order(smollm2):
    model, tok = smollm2
    grammars = GrammarCache(tok, model.config.vocab_size)
    grammars.matcher(schema())
    grammars.matcher(schema(dict(reversed(list(PERSON.items())))))
    grammars.matcher(StructuredOutputsParams(json=json.dumps(PERSON)))
    assert (grammars.misses, grammars.hits) == (1, 2)


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "strin"}, "strin"),
        ({"type": "string", "pattern": "a("}, "unclosed group"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_by_name(llm, spec, words):
    assert words in (grammar_error(schema(spec)) or "")
    with pytest.raises(ValueError, match=words):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=schema(spec)))
    assert "bad" not in llm.engine.requests


def test_a_spec_needs_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_the_mask_stays_in_its_row_and_logprobs_stay_raw(llm, smollm2):
    """A constrained request beside a free one: the free one's tokens are what it gets alone, and the
    constrained one's logprobs come from the unmasked logits (as vLLM reports them)."""
    _, tok = smollm2
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([chat(tok, QUESTIONS[0])], free)[0].outputs[0].token_ids
    constrained = SamplingParams(
        temperature=0, max_tokens=12, logprobs=1, structured_outputs=schema()
    )
    both = llm.generate([chat(tok, QUESTIONS[0])] * 2, [free, constrained])
    assert both[0].outputs[0].token_ids == alone
    first = both[1].outputs[0].logprobs[0]
    # the grammar forced a "{" token; unmasked, the model preferred another (its top-1 alternative)
    assert tok.decode([first.token_id]).startswith("{") and first.top[0][0] != first.token_id
