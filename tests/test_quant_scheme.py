"""QuantScheme (quant/scheme.py): one frozen, validated object for bits, group size, granularity,
symmetric and act-order; the loose argument forms from before it give the same codes."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import (
    AWQOptions,
    GPTQOptions,
    QuantScheme,
    awq_quantize_model,
    gptq_quantize_model,
    gptq_quantize_weight,
    quantize_weight,
    rtn_quantize_model,
)
from labkit.quant.awq import search_scale
from labkit.quant.qat import QATSchedule, convert_qat_model, prepare_qat, train_qat


def small_llama(hidden=96):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def same_codes(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("q", "scale", "zero", "g_idx"))


@pytest.mark.parametrize(
    "bad", [dict(bits=9), dict(bits=True), dict(granularity="row"), dict(group_size=0)]
)
def test_a_bad_scheme_fails_on_construction_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        QuantScheme(**bad)


def test_the_scheme_is_frozen_and_checks_itself_against_the_layers():
    scheme = QuantScheme(4, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 3  # type: ignore[misc]
    assert scheme.columns_per_group(576) == 64
    assert QuantScheme(4, granularity="channel").columns_per_group(576) == 576
    assert QuantScheme(4, granularity="tensor").columns_per_group(576) == 0
    with pytest.raises(ValueError, match=r"group_size 128 .* of layer.b; .* use 32, 64, or -1"):
        QuantScheme(4, 128).check_layers({"layer.a": 1536, "layer.b": 576})


def test_the_loose_form_gives_the_same_codes_as_the_scheme():
    w = torch.randn(16, 96)
    loose = quantize_weight(w, 3, False, "group", 32)
    assert same_codes(loose, quantize_weight(w, QuantScheme(3, 32, symmetric=False)))
    a, b = small_llama(), small_llama()
    ra = rtn_quantize_model(a, 4, 32, symmetric=False)
    rb = rtn_quantize_model(b, QuantScheme(4, 32, symmetric=False))
    assert ra.keys() == rb.keys() and all(same_codes(ra[k], rb[k]) for k in ra)
    with pytest.raises(TypeError, match="symmetric"):
        rtn_quantize_model(small_llama(), QuantScheme(4, 32), symmetric=False)


def test_gptq_takes_a_scheme_and_options_or_the_loose_keywords():
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    H, w = 2 * x.t() @ x / len(x), torch.randn(32, 64)
    loose, _ = gptq_quantize_weight(w, H, 4, group_size=32, act_order=True, static_groups=True)
    scheme = QuantScheme(4, 32, act_order=True)
    typed, _ = gptq_quantize_weight(w, H, scheme, GPTQOptions(static_groups=True))
    assert same_codes(loose, typed)
    with pytest.raises(TypeError):
        gptq_quantize_weight(w, H, scheme, dampening=0.1)  # a typo is an error, not ignored


def test_awq_search_takes_a_scheme_and_the_old_dict_with_a_deprecation_warning():
    x, w = torch.randn(128, 64).abs() + 0.1, torch.randn(16, 64)
    stats = (x.mean(0), x.t() @ x / len(x))
    scheme = QuantScheme(3, 32)
    s_new, alpha_new = search_scale(*stats, [w], scheme)
    with pytest.warns(DeprecationWarning, match="QuantScheme"):
        qargs = dict(bits=3, symmetric=True, granularity="group", group_size=32)
        s_old, alpha_old = search_scale(*stats, [w], qargs)
    assert alpha_new == alpha_old and torch.equal(s_new, s_old)


def test_the_model_quantizers_take_a_scheme_and_options_as_the_notebooks_call_them():
    calib = torch.randint(0, 64, (2, 16))
    loose, typed = small_llama(), small_llama()
    ra = gptq_quantize_model(
        loose, calib, 4, 32, act_order=True, static_groups=True, progress=False
    )
    rb = gptq_quantize_model(
        typed,
        calib,
        QuantScheme(4, 32, act_order=True),
        options=GPTQOptions(static_groups=True),
        progress=False,
    )
    assert all(same_codes(ra[k], rb[k]) for k in ra)
    ra = awq_quantize_model(small_llama(), calib, 4, 32, n_grid=5, progress=False)
    rb = awq_quantize_model(
        small_llama(), calib, QuantScheme(4, 32), options=AWQOptions(n_grid=5), progress=False
    )
    assert all(same_codes(ra[k], rb[k]) for k in ra)
    with pytest.raises(TypeError):  # options after the group-size slot are keyword-only
        gptq_quantize_model(small_llama(), calib, QuantScheme(4, 32), 32, GPTQOptions())


def test_qat_takes_a_scheme_and_a_schedule_or_the_loose_form():
    ids = torch.randint(0, 64, (400,))
    loose = prepare_qat(small_llama(), 3, 32, symmetric=False)
    typed = prepare_qat(small_llama(), QuantScheme(3, 32, symmetric=False))
    a = train_qat(loose, ids, 3, 2, 16, 1e-3, warmup=1)
    b = train_qat(typed, ids, QATSchedule(3, 2, 16, 1e-3, warmup=1))
    assert a == b
    ra, rb = convert_qat_model(loose), convert_qat_model(typed)
    assert all(same_codes(ra[k], rb[k]) for k in ra)
