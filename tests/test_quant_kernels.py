"""The fast int4/int8 kernels behind QuantLinear, checked against the reference unpack path."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import (
    QuantLinear,
    awq_quantize_model,
    gptq_quantize_model,
    pack_model,
    quantize_weight,
    rtn_quantize_model,
)
from labkit.quant.kernels import build_int4, build_int8
from labkit.quant.packing import unpack_gptq


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def calib_ids(n=8, seq=32, seed=0):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


METHODS = {
    "rtn": lambda m, bits, gs, sym: rtn_quantize_model(m, bits, gs, symmetric=sym),
    "gptq": lambda m, bits, gs, sym: gptq_quantize_model(
        m, calib_ids(), bits, gs, symmetric=sym, progress=False
    ),
    "awq": lambda m, bits, gs, sym: awq_quantize_model(
        m, calib_ids(), bits, gs, symmetric=sym, progress=False
    ),
}


def packed_layers(method, bits, group_size, symmetric):
    model = tiny_llama()
    results = METHODS[method](model, bits, group_size, symmetric)
    pack_model(model, results)
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


INT4_CASES = [("rtn", gs, sym) for gs in (32, 64, 128) for sym in (False, True)]
INT4_CASES += [("gptq", 32, False), ("gptq", 128, True), ("awq", 64, False)]


@pytest.mark.parametrize("method, group_size, symmetric", INT4_CASES)
def test_int4_repacking_keeps_every_dequantized_weight(method, group_size, symmetric):
    for layer in packed_layers(method, 4, group_size, symmetric):
        q, zero, scale, _ = unpack_gptq(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits
        )
        run = build_int4(q, zero, scale, group_size, None, dtype=torch.float32)
        through_kernel = run(torch.eye(layer.in_features)).t()  # [out, in]
        assert torch.equal(through_kernel, layer.dequantize_weight())


@pytest.mark.parametrize("method, symmetric", [("rtn", False), ("rtn", True), ("gptq", False)])
def test_int8_repacking_keeps_every_dequantized_weight(method, symmetric):
    for layer in packed_layers(method, 8, None, symmetric):
        q, zero, scale, _ = unpack_gptq(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits
        )
        run = build_int8(q, zero, scale, None, dtype=torch.float32)
        through_kernel = run(torch.eye(layer.in_features)).t()
        assert torch.equal(through_kernel, layer.dequantize_weight())


@pytest.mark.parametrize(
    "bits, group_size, symmetric, kernel",
    [
        (4, 32, False, "int4pack"),
        (4, 64, True, "int4pack"),
        (4, 128, False, "int4pack"),
        (8, None, False, "int8pack"),
        (8, None, True, "int8pack"),
    ],
)
def test_fast_forward_matches_reference(bits, group_size, symmetric, kernel):
    torch.manual_seed(0)
    w, bias = torch.randn(192, 256) * 0.05, torch.randn(192)
    gran = "group" if group_size else "channel"
    layer = QuantLinear.from_quantized(quantize_weight(w, bits, symmetric, gran, group_size), bias)
    assert layer.kernel_name == kernel
    for x in (torch.randn(256), torch.randn(3, 256), torch.randn(2, 5, 256)):
        y, ref = layer(x), layer.reference_forward(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        # bfloat16 activations and scales: a few tenths of a percent
        assert (y - ref).norm() / ref.norm() < 1e-2


def test_layers_without_a_kernel_fall_back_to_unpacking():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    cases = {
        "3 bits": quantize_weight(w, 3, False, "group", 64),
        "8-bit groups": quantize_weight(w, 8, False, "group", 64),
        "group of 16": quantize_weight(w, 4, False, "group", 16),
    }
    act_order = quantize_weight(w, 4, False, "group", 64)
    act_order.g_idx = act_order.g_idx[torch.randperm(256)]  # columns no longer in contiguous groups
    cases["act-order"] = act_order
    x = torch.randn(2, 256)
    for why, qw in cases.items():
        layer = QuantLinear.from_quantized(qw)
        assert layer.kernel_name == "unpack", why
        assert torch.equal(layer(x), layer.reference_forward(x)), why
    layer = QuantLinear.from_quantized(quantize_weight(w, 4, False, "group", 64), fast=False)
    assert layer.kernel_name == "unpack"


def test_new_weights_rebuild_the_kernel():
    torch.manual_seed(0)
    a = QuantLinear.from_quantized(quantize_weight(torch.randn(64, 256), 4, False, "group", 64))
    b = QuantLinear.from_quantized(quantize_weight(torch.randn(64, 256), 4, False, "group", 64))
    x = torch.randn(1, 256)
    a(x)  # builds a's kernel
    a.load_state_dict(b.state_dict())
    assert (a(x) - b.reference_forward(x)).norm() / b.reference_forward(x).norm() < 1e-2
    assert "kernel" not in "".join(a.state_dict())  # the packed copy is not saved twice


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, None)])
def test_same_greedy_tokens_as_the_reference_path(course, bits, group_size):
    model, tokenizer = course
    quantized = copy.deepcopy(model)
    gran = "group" if group_size else "channel"
    results = rtn_quantize_model(quantized, bits, group_size, gran, symmetric=False)
    pack_model(quantized, results)
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert {m.kernel_name for m in layers} == {"int4pack" if bits == 4 else "int8pack"}
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids

    def greedy():
        with torch.no_grad():
            return quantized.generate(
                ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )

    fast = greedy()
    for m in layers:
        m.fast = False
    assert torch.equal(fast, greedy())
