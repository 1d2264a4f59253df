import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from labkit.evaluate import evaluate_lm, memory_bytes, windows


@given(n=st.integers(2, 400), window=st.integers(2, 64), stride=st.integers(1, 80))
def test_windows_score_every_token_once_with_context(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert 0 <= begin < first < end <= n and end - begin <= window
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError):
        windows(10, 1, 1)
    with pytest.raises(ValueError):
        windows(10, 8, 0)


def test_perplexity_matches_hf_loss_on_one_window(course):
    model, tokenizer = course
    ids = tokenizer(
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.",
        return_tensors="pt",
    )["input_ids"][0]
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    result = evaluate_lm(model, ids)
    assert result["tokens"] == len(ids) - 1
    assert math.isclose(result["perplexity"], math.exp(loss), rel_tol=1e-4)


def test_batching_does_not_change_the_answer_and_self_kl_is_zero(course):
    model, tokenizer = course
    from labkit.data import heldout_ids

    ids = heldout_ids(tokenizer, max_tokens=1500)
    one = evaluate_lm(model, ids, window=256, batch_size=1)
    many = evaluate_lm(model, ids, window=256, batch_size=8, reference=model)
    assert math.isclose(one["perplexity"], many["perplexity"], rel_tol=1e-4)
    assert abs(many["kl"]) < 1e-5 and many["top1"] == 1.0
    assert 5 < one["perplexity"] < len(tokenizer)  # better than uniform guessing


def test_kl_and_top1_see_a_perturbed_model(course):
    import copy

    model, tokenizer = course
    from labkit.data import heldout_ids

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean() * 0.5)
    ids = heldout_ids(tokenizer, max_tokens=600)
    result = evaluate_lm(noisy, ids, window=256, reference=model)
    assert result["kl"] > 1e-3 and result["top1"] < 1.0


def test_window_longer_than_context_is_rejected(course):
    model, tokenizer = course
    with pytest.raises(ValueError, match="context"):
        evaluate_lm(model, torch.arange(10), window=model.config.max_position_embeddings + 1)


def test_memory_bytes_counts_tied_weights_once(course):
    model, _ = course
    naive = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert model.config.tie_word_embeddings
    emb = model.get_input_embeddings().weight
    assert memory_bytes(model) <= naive - emb.numel() * emb.element_size() + 1024


# ---- quality beyond perplexity: labkit.evalset and labkit.quality ---------------------------------


def test_committed_multiple_choice_file_is_what_the_builder_writes():
    from labkit.evalset import MC_FILE, build, load_items, to_jsonl

    assert MC_FILE.read_text(encoding="utf-8") == to_jsonl(build())
    items = load_items()
    assert len(items) == 120 and {len(i["choices"]) for i in items} == {4}
    for item in items:
        assert not item["context"].endswith(" ")
        assert not any(c.startswith(" ") for c in item["choices"])
        assert len(set(item["choices"])) == 4


def test_a_malformed_item_is_a_clear_error(tmp_path):
    from labkit.evalset import load_items

    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: 'answer' must index 'choices'"):
        load_items(path)


def test_encode_pair_splits_like_lm_eval_harness(course):
    from labkit.quality import encode_pair

    _, tokenizer = course
    ctx, cont = encode_pair(tokenizer, "She must laugh at such a", " close")
    whole = tokenizer("She must laugh at such a close", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and len(cont) >= 1
    assert tokenizer.decode(cont) == " close"


def test_cached_choice_scores_equal_the_plain_full_sequence_ones(course):
    from labkit.evalset import load_items
    from labkit.quality import choice_logprobs, choice_logprobs_reference

    model, tokenizer = course
    item = load_items()[0]
    # one choice several tokens long, so the KV-cache path scores more than the first token
    choices = item["choices"] + ["extraordinarily unaccountable"]
    fast = choice_logprobs(model, tokenizer, item["context"], choices)
    plain = choice_logprobs_reference(model, tokenizer, item["context"], choices)
    assert fast == pytest.approx(plain, abs=1e-3)


def test_multiple_choice_accuracy_beats_chance_and_drops_for_a_broken_model(course):
    import copy

    from labkit.evalset import load_items
    from labkit.quality import multiple_choice

    model, tokenizer = course
    items = load_items()[:24]
    good = multiple_choice(model, tokenizer, items)
    assert good["items"] == 24 and good["acc"] >= 0.5  # chance is 0.25
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.model.layers.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean() * 3)
    assert multiple_choice(broken, tokenizer, items)["acc"] < good["acc"]


def test_chat_answers_are_compared_token_for_token(course):
    from labkit.quality import compare_answers

    _, tokenizer = course
    prompts = [{"accept": ["Paris"]}, {"accept": ["seven", "7"]}]
    paris = tokenizer("It is Paris.", add_special_tokens=False)["input_ids"]
    other = tokenizer("It is Rome.", add_special_tokens=False)["input_ids"]
    r = compare_answers([paris, other], [paris, paris], tokenizer, prompts)
    assert r["chat_same"] == 0.5 and r["chat_mentions"] == 0.5
    assert 0.5 < r["chat_prefix"] < 1.0  # "It is" matches, then the answers part
