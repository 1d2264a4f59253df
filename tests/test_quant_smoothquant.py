"""labkit.quant.smoothquant, w8a8 and int8_gemm: smoothing keeps the function, W8A8, LLM.int8(), INT8 GEMMs."""

import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import checks
from labkit.quant.int8_gemm import int8_linear, linear_shapes, quantize_rows_int8, time_gemms
from labkit.quant.smoothquant import (
    activation_absmax,
    check_smoothing,
    smooth_model,
    smoothed_absmax,
    smoothing_error,
    smoothing_scales,
)
from labkit.quant.w8a8 import (
    W8A8Linear,
    fake_quant,
    int8_decomposed_matmul,
    llm_int8_model,
    w8a8_model,
)


def tiny_llama(seed=0):
    """Two Llama blocks with GQA (so v->o is not smoothable) and a few loud input channels."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 30
            layer.post_attention_layernorm.weight[:3] *= 30
    return model


def ids(n=4, seq=24, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def outlier_matrix(tokens=256, d=128, seed=0):
    """x [tokens, d] with two channels 50x larger than the rest in every token, w [64, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    x[:, [5, 77]] *= 50
    return x, torch.randn(64, d, generator=g) / d**0.5


def rel_err(y, y_hat):
    return ((y - y_hat).norm() / y.norm()).item()


# ---- smoothing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothing_alone_keeps_the_logits(alpha):
    model = tiny_llama()
    absmax = activation_absmax(model, ids())
    smoothed = copy.deepcopy(model)
    scales = smooth_model(smoothed, absmax, alpha)
    assert len(scales) == 2 * (3 + 3)  # q,k,v + gate,up + down (up->down) per block; GQA skips v->o
    assert check_smoothing(model, smoothed, ids(seed=1)) <= 1e-4
    # and it really changed the weights (a no-op would pass the check too)
    w0 = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(smoothed.model.layers[0].self_attn.q_proj.weight, w0)


def test_check_smoothing_catches_a_broken_fold():
    model = tiny_llama()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.gate_proj.weight[:, :3] *= (
            4  # scaled without the 1/s in the norm
        )
    assert smoothing_error(model, broken, ids()) > 1e-3
    with pytest.raises(ValueError, match="smoothing changed the logits"):
        check_smoothing(model, broken, ids())


def test_alpha_limits_flatten_activations_or_weights():
    model = tiny_llama()
    absmax = activation_absmax(model, ids())
    name = "model.layers.1.mlp.down_proj"
    for alpha in (0.0, 1.0):
        m = copy.deepcopy(model)
        scales = smooth_model(m, absmax, alpha)
        x_after = smoothed_absmax(absmax, scales)[name]
        w_after = m.get_submodule(name).weight.abs().amax(0)  # per input channel
        flat = (
            w_after if alpha == 0 else x_after
        )  # alpha=0: weights' columns all 1; alpha=1: activations'
        torch.testing.assert_close(flat, torch.ones_like(flat), rtol=1e-4, atol=1e-4)
    # the measured maxima after smoothing are what smoothed_absmax predicts
    m = copy.deepcopy(model)
    scales = smooth_model(m, absmax, 0.5)
    torch.testing.assert_close(
        activation_absmax(m, ids())[name],
        smoothed_absmax(absmax, scales)[name],
        rtol=1e-4,
        atol=1e-5,
    )


def test_smoothing_scales_formula():
    x, w = torch.tensor([100.0, 1.0, 4.0]), torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(smoothing_scales(x, w, 0.5), (x / w).sqrt())
    torch.testing.assert_close(smoothing_scales(x, w, 1.0), x)
    torch.testing.assert_close(smoothing_scales(x, w, 0.0), 1 / w)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", None, True])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match=r"alpha .* must be a number in \[0, 1\]"):
        smoothing_scales(torch.ones(3), torch.ones(3), alpha)
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(tiny_llama(), {}, alpha)


# ---- W8A8 ----------------------------------------------------------------------------------------------


def test_per_token_beats_per_tensor_on_outlier_channels_and_smoothing_beats_both():
    x, w = outlier_matrix()
    y = x @ w.t()
    w_hat = fake_quant(w, per_row=True)
    per_tensor = rel_err(y, fake_quant(x) @ w_hat.t())
    per_token = rel_err(y, fake_quant(x, per_row=True) @ w_hat.t())
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    smooth = rel_err(y, fake_quant(x / s) @ fake_quant(w * s, per_row=True).t())
    assert per_token < 0.8 * per_tensor
    assert smooth < 0.5 * per_tensor


def test_w8a8_linear_matches_the_integer_matmul():
    """Fake quantization in float == int8 x int8 accumulated in int32, then rescaled (per token)."""
    x, w = outlier_matrix(tokens=16)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    w_q, w_scale = quantize_rows_int8(w)
    want = checks.reference_int8_linear_dynamic(x, w_q, w_scale[:, 0])
    torch.testing.assert_close(W8A8Linear(lin, act="token")(x), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(int8_linear(x, w_q.t().contiguous(), w_scale), want)


def test_static_per_tensor_saturates_beyond_the_calibrated_range():
    x = torch.tensor([[1.0, -3.0, 10.0]])
    out = fake_quant(x, absmax=torch.tensor(2.0))
    assert out.abs().max().item() == pytest.approx(2.0, rel=1e-6)
    assert fake_quant(x).abs().max().item() == pytest.approx(10.0, rel=1e-6)


def test_fp8_e4m3_rounds_to_3_mantissa_bits_with_range_448():
    x = torch.tensor([448.0, 1.0, 1.0625, 1.1875, 300.0])
    # scale 1 (max 448): 1.0625 is halfway to 1.125 -> round to even 1.0; 1.1875 -> 1.25; 300 -> 288
    torch.testing.assert_close(
        fake_quant(x, fp8=True), torch.tensor([448.0, 1.0, 1.0, 1.25, 288.0])
    )
    # relative error bounded by half a mantissa step (2^-4) wherever a value is not tiny
    y = torch.randn(1000) * 10
    assert ((fake_quant(y, fp8=True) - y).abs() <= y.abs() / 16 + 1e-3).all()


def test_w8a8_model_replaces_every_block_linear_and_stays_close():
    model = tiny_llama()
    ref = model(input_ids=ids()).logits
    for act in ("token", "tensor"):
        q = w8a8_model(copy.deepcopy(model), act=act)
        n = sum(isinstance(m, W8A8Linear) for m in q.modules())
        assert n == 2 * 7 and isinstance(q.lm_head, nn.Linear)
        assert rel_err(ref, q(input_ids=ids()).logits) < 0.25


def test_smoothquant_rescues_per_tensor_w8a8_on_the_tiny_model():
    model = tiny_llama()
    absmax = activation_absmax(model, ids())
    ref = model(input_ids=ids(seed=1)).logits
    naive = w8a8_model(copy.deepcopy(model), act="tensor", act_absmax=absmax)
    sq = copy.deepcopy(model)
    scales = smooth_model(sq, absmax, 0.5)
    w8a8_model(sq, act="tensor", act_absmax=smoothed_absmax(absmax, scales))
    assert rel_err(ref, sq(input_ids=ids(seed=1)).logits) < 0.75 * rel_err(
        ref, naive(input_ids=ids(seed=1)).logits
    )


@pytest.mark.parametrize("bits", [1, 9, 8.0, "8", True])
def test_bad_bits_raise(bits):
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        W8A8Linear(lin, bits=bits)
    with pytest.raises(ValueError, match="bits"):
        fake_quant(torch.randn(3, 8), bits=bits)


def test_bad_activation_settings_raise():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        W8A8Linear(lin, act="channel")
    with pytest.raises(ValueError, match="needs act='tensor'"):
        W8A8Linear(lin, act="token", act_absmax=torch.ones(8))
    with pytest.raises(ValueError, match="per tensor"):
        fake_quant(torch.randn(3, 8), per_row=True, absmax=torch.tensor(1.0))


# ---- LLM.int8() ----------------------------------------------------------------------------------------


def test_int8_decomposition_is_exact_at_threshold_zero_and_helps_on_outliers():
    x, w = outlier_matrix()
    y = x @ w.t()
    torch.testing.assert_close(int8_decomposed_matmul(x, w, 0.0), y, rtol=1e-6, atol=1e-6)
    everything_int8 = rel_err(y, int8_decomposed_matmul(x, w, float("inf")))
    torch.testing.assert_close(  # an infinite threshold is plain per-token W8A8
        int8_decomposed_matmul(x, w, float("inf")),
        fake_quant(x, per_row=True) @ fake_quant(w, per_row=True).t(),
    )
    decomposed = rel_err(y, int8_decomposed_matmul(x, w, 6.0))  # the 2 loud columns stay float
    assert decomposed < 0.3 * everything_int8


def test_llm_int8_model_at_threshold_zero_is_the_float_model():
    model = tiny_llama()
    ref = model(input_ids=ids()).logits
    q = llm_int8_model(copy.deepcopy(model), 0.0)
    torch.testing.assert_close(q(input_ids=ids()).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [-1.0, "6", None])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        int8_decomposed_matmul(torch.randn(2, 4), torch.randn(3, 4), threshold)


# ---- real INT8 GEMMs -----------------------------------------------------------------------------------


def test_int_mm_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    for m in (1, 7, 33):
        a = torch.randint(-127, 128, (m, 96), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (96, 40), dtype=torch.int8, generator=g)
        assert torch.equal(torch._int_mm(a, b), a.int() @ b.int())


def test_time_gemms_reports_every_path_per_shape():
    model = tiny_llama()
    shapes = linear_shapes(model)
    assert shapes == [(64, 32), (64, 64), (64, 128), (128, 64)]
    rows = time_gemms(shapes[:1], tokens=4, runs=2)
    assert set(rows[0]) == {"in", "out", "tokens", "fp32", "int_mm", "int8_linear", "fbgemm"}
    assert all(rows[0][k] > 0 for k in ("fp32", "int_mm", "int8_linear", "fbgemm"))


# ---- exercise check ------------------------------------------------------------------------------------


def test_smoothing_scales_check(capsys):
    assert checks.check_smoothing_scales(smoothing_scales) is smoothing_scales
    assert "[ok]" in capsys.readouterr().out
    wrong = lambda x, w, a: x**a / w**a  # noqa: E731
    assert checks.check_smoothing_scales(wrong) is smoothing_scales
    assert "[x]" in capsys.readouterr().out
