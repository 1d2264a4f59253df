import pytest
import torch

from labkit.data import calibration_batches, heldout_ids, sample_prompts
from labkit.timing import time_it


def test_time_it_runs_warmup_plus_runs_times():
    calls = []
    t = time_it(lambda: calls.append(1), warmup=2, runs=5)
    assert len(calls) == 7 and len(t.seconds) == 5 and t.min <= t.median
    with pytest.raises(ValueError):
        time_it(lambda: None, runs=0)


def test_calibration_is_seeded_and_from_the_training_split(course):
    _, tokenizer = course
    a = calibration_batches(tokenizer, n_samples=4, seq_len=64, seed=1)
    b = calibration_batches(tokenizer, n_samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, calibration_batches(tokenizer, n_samples=4, seq_len=64, seed=2))
    held = heldout_ids(tokenizer, max_tokens=None).tolist()
    window = a[0, :16].tolist()
    assert not any(held[i : i + 16] == window for i in range(len(held) - 16))


def test_sample_prompts_are_reproducible():
    assert sample_prompts(5, seed=0) == sample_prompts(5, seed=0)
    assert all(4 <= len(p.split()) <= 24 for p in sample_prompts(20, seed=1))
