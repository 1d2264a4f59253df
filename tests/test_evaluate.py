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
