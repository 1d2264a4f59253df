"""Bytes and FLOPs per decode step (labkit.roofline): counted from the model, checked by hand."""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import pack_model, rtn_quantize_model
from labkit.roofline import (
    batch1_matmul_roof,
    decode_bound,
    first_difference,
    flops_per_token,
    kv_bytes_per_token,
    last_logits,
    last_logits_decoded,
    measure_one_row_rate,
    measure_read_bandwidth,
    time_in_matmuls,
    weight_bytes_per_step,
    weights_per_step,
)

HIDDEN, MLP, VOCAB, LAYERS, KV_HEADS = 128, 256, 512, 2, 1


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=KV_HEADS,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


# q, k, v, o, gate, up, down per layer, then the output head
LINEAR_WEIGHTS = (
    LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * 64 + 3 * HIDDEN * MLP) + VOCAB * HIDDEN
)


def test_weight_bytes_and_flops_count_every_linear_once():
    model = tiny_llama()
    assert weight_bytes_per_step(model) == 4 * LINEAR_WEIGHTS
    assert weight_bytes_per_step(model.to(torch.bfloat16)) == 2 * LINEAR_WEIGHTS
    assert flops_per_token(model) == 2 * LINEAR_WEIGHTS
    assert weights_per_step(model) == LINEAR_WEIGHTS
    # attention over 10 past tokens: q.k and p.v, 2 FLOPs each per head dimension, every head
    assert flops_per_token(model, 10) == 2 * LINEAR_WEIGHTS + 4 * LAYERS * 2 * 64 * 10


def test_int4_reads_codes_and_group_scales_only():
    model = tiny_llama()
    pack_model(model, rtn_quantize_model(model, 4, 64, symmetric=False, include_head=True))
    groups = LINEAR_WEIGHTS // 64
    # half a byte per code, a bfloat16 (scale, offset) pair per group
    assert weight_bytes_per_step(model) == LINEAR_WEIGHTS // 2 + groups * 2 * 2
    assert weights_per_step(model) == LINEAR_WEIGHTS  # fewer bytes, the same weights to unpack


def test_kv_bytes_per_token():
    cfg = tiny_llama().config
    assert kv_bytes_per_token(cfg, torch.float32) == 2 * LAYERS * KV_HEADS * 64 * 4
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * LAYERS * KV_HEADS * 64 * 2


def test_decode_bound_switches_from_memory_to_compute():
    memory = decode_bound(1e9, 0, 2e8, 1, bandwidth=1e10, flop_rate=1e11)
    assert memory["bound"] == "memory" and memory["tok_s"] == pytest.approx(10)
    # 1000 sequences: 2e11 FLOPs per step at 1e11 FLOP/s take 2 s, the weights 0.1 s
    compute = decode_bound(1e9, 0, 2e8, 1000, bandwidth=1e10, flop_rate=1e11)
    assert compute["bound"] == "compute" and compute["tok_s"] == pytest.approx(500)
    # every sequence's KV cache is read too
    assert decode_bound(1e9, 1e9, 0, 1, 1e10, 1e11)["tok_s"] == pytest.approx(5)


def test_bandwidth_is_measured_on_written_pages():
    assert measure_read_bandwidth(mib=16, runs=2) > 0


def test_one_row_rate_counts_weights_per_second_of_one_row():
    def slow_layer(x):  # a 100 x 200 layer that takes at least 2 ms per call
        time.sleep(0.002)
        return x.new_zeros(x.shape[0], 200)

    rate = measure_one_row_rate(slow_layer, 100, runs=3)
    assert 100 * 200 / 0.05 < rate <= 100 * 200 / 0.002


def test_batch1_matmul_roof_is_set_by_the_slower_of_memory_and_the_kernel():
    model = tiny_llama()  # fp32: 4 bytes per weight
    fast_kernel = batch1_matmul_roof(model, bandwidth=4e9, one_row_rate=1e12)
    assert fast_kernel["limit"] == "memory"
    assert fast_kernel["roof_s"] == pytest.approx(LINEAR_WEIGHTS / 1e9)  # 4 bytes at 4 GB/s
    slow_kernel = batch1_matmul_roof(model, bandwidth=4e9, one_row_rate=1e8)
    assert slow_kernel["limit"] == "kernel"
    assert slow_kernel["roof_s"] == pytest.approx(LINEAR_WEIGHTS / 1e8)


def test_time_in_matmuls_splits_a_step_into_matmuls_and_the_rest():
    w, x = torch.randn(512, 512), torch.randn(4, 512)

    def step():  # one matmul, then small ops
        y = torch.nn.functional.linear(x, w)
        for _ in range(20):
            y = (y * 0.5).relu()

    split = time_in_matmuls(step, calls=3)
    assert 0 < split["matmul_s"] <= split["step_s"]
    assert split["other_s"] == pytest.approx(split["step_s"] - split["matmul_s"])
    assert time_in_matmuls(lambda: (x * 2).relu(), calls=3)["matmul_s"] == 0  # no matmul at all


def test_greedy_differences_are_judged_against_the_two_paths_measured_error():
    """first_difference: None when the tokens agree; at the first differing token a near-tie when the
    reference's margin is within the paths' largest logit difference, not when it is wider."""
    ref_logits = torch.tensor(
        [0.0, 5.0, 4.999, 1.0]
    )  # tokens 1 and 2 nearly tied, token 3 far behind

    def reference(ids):
        return ref_logits

    def fast(ids):
        return ref_logits + torch.tensor([0.0, 0.0, 0.002, 0.0])

    assert first_difference(reference, fast, [0], [1, 1], [1, 1]) is None
    tie = first_difference(reference, fast, [0], [1, 1], [1, 2])
    assert tie["step"] == 1 and tie["near_tie_within_rounding"]
    assert tie["reference_logit_margin"] == pytest.approx(0.001, abs=1e-6)
    assert tie["fast_logit_error_max"] == pytest.approx(0.002, abs=1e-6)
    assert not first_difference(reference, fast, [0], [1], [3])["near_tie_within_rounding"]
    assert not first_difference(reference, fast, [0], [3], [1])["near_tie_within_rounding"]


def test_decode_and_prefill_paths_give_nearly_the_same_last_logits():
    model = tiny_llama().eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    decoded, full = last_logits_decoded(model)(ids), last_logits(model)(ids)
    assert decoded.shape == full.shape == (VOCAB,)
    assert torch.allclose(decoded, full, atol=1e-4)
