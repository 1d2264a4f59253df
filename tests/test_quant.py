"""labkit.quant: primitives, packing, QuantLinear, RTN/GPTQ/AWQ, PTQ and the GPTQ export."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import (
    QuantLinear,
    awq_quantize_model,
    checks,
    export_gptq,
    fake_quantize,
    gptq_quantize_model,
    gptq_quantize_weight,
    load_gptq,
    pack_model,
    pack_rows,
    quantization_error,
    quantize_asymmetric,
    quantize_symmetric,
    quantize_weight,
    rtn_quantize_model,
    unpack_rows,
)
from labkit.quant.awq import (
    _outputs_error,
    fold_scales,
    input_stats,
    scale_groups,
    search_clip,
    search_scale,
)
from labkit.quant.gptq import Hessian
from labkit.quant.layers import check_group_size, valid_group_sizes
from labkit.quant.packing import dequantize_gptq, pack_gptq
from labkit.quant.ptq import dynamic_int8, static_int8


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    # make a few input channels "salient" (large activations), as trained transformers have
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 8
            layer.post_attention_layernorm.weight[:4] *= 8
    return model


def calib_ids(n=8, seq=32, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# ---- primitives ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(4, 8), bits=bits)


def test_bad_group_size_and_shape_raise():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 96), 4, group_size=64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4, 8, 2), 4)
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(torch.randn(4, 8), 4, granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 8), 4, group_size=0)


def smollm2_shaped_llama():
    """Tiny, but with SmolLM2's awkward widths: hidden 576 (= 4.5 x 128), MLP 1536."""
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_group_size_that_does_not_divide_a_layer_names_it_and_the_valid_choices(method):
    model = smollm2_shaped_llama()
    before = copy.deepcopy(model.state_dict())
    quantize = {
        "rtn": lambda: rtn_quantize_model(model, 4, 128),
        "gptq": lambda: gptq_quantize_model(model, torch.zeros(1, 8, dtype=torch.long), 4, 128),
        "awq": lambda: awq_quantize_model(model, torch.zeros(1, 8, dtype=torch.long), 4, 128),
    }[method]
    with pytest.raises(ValueError) as err:
        quantize()
    message = str(err.value)
    assert "group_size 128" in message and "model.layers.0.self_attn.q_proj" in message
    assert "576" in message and "use 32, 64" in message and "-1" in message
    # nothing was touched: the error comes before any work
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert valid_group_sizes(model) == [32, 64]
    check_group_size(model, 64)  # divides 576 and 1536
    check_group_size(model, -1)  # per-channel needs no check


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_shrinks_with_bits_and_granularity(symmetric):
    w = torch.randn(64, 256)
    w[:, 3] *= 20  # an outlier column: per-tensor and per-channel suffer, groups contain it
    w[5] *= 10  # an outlier row: per-tensor suffers
    errs = [quantization_error(w, fake_quantize(w, b, symmetric, "group", 64)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    by_gran = [
        quantization_error(w, fake_quantize(w, 4, symmetric, g, 32))
        for g in ("tensor", "channel", "group")
    ]
    assert by_gran[0] > by_gran[1] > by_gran[2]


@given(st.integers(2, 8), st.booleans(), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_rounding_error_bounded_by_half_a_step(bits, symmetric, seed):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    qw = quantize_weight(w, bits, symmetric, "group", 16)
    step = qw.scale[:, qw.g_idx.long()]
    assert ((w - qw.dequantize()).abs() <= step / 2 + 1e-6).all()
    assert qw.q.min() >= 0 and qw.q.max() <= 2**bits - 1


def test_zero_is_exact_and_textbook_formulas():
    x = torch.tensor([-3.0, 0.0, 0.7, 6.0])
    q, s = quantize_symmetric(x, 8)
    assert s == pytest.approx(6.0 / 127) and q[1] == 0 and q[3] == 127
    q, s, z = quantize_asymmetric(x, 8)
    assert s == pytest.approx(9.0 / 255) and z == 85 and ((q.float() - z) * s)[1] == 0
    qw = quantize_weight(
        torch.tensor([[-1.0, 0.0, 0.3, 2.0]]), 3, symmetric=False, granularity="channel"
    )
    assert qw.dequantize()[0, 1] == 0


def test_asymmetric_wins_on_one_sided_values():
    w = torch.rand(32, 128)  # all positive, like post-ReLU values
    assert quantization_error(w, fake_quantize(w, 4, False, "channel")) < 0.6 * quantization_error(
        w, fake_quantize(w, 4, True, "channel")
    )


# ---- packing -------------------------------------------------------------------------------------------


def _autogptq_pack_3bit(intweight):
    """AutoGPTQ's original 3-bit packing loop (reference for the layout)."""
    intweight = intweight.to(torch.int64)
    qweight = torch.zeros(intweight.shape[0] // 32 * 3, intweight.shape[1], dtype=torch.int64)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    qweight &= 0xFFFFFFFF
    return torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_layout(bits):
    q = torch.randint(0, 2**bits, (128, 24))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (128 * bits // 32, 24)
    assert torch.equal(unpack_rows(packed, bits, 128), q.to(torch.int32))
    if bits == 3:
        assert torch.equal(packed, _autogptq_pack_3bit(q))
    else:  # value j of each word at bit j*bits
        per = 32 // bits
        expect = sum((q[j::per].to(torch.int64) << (bits * j)) for j in range(per)) & 0xFFFFFFFF
        assert torch.equal(packed.to(torch.int64) & 0xFFFFFFFF, expect)


def test_pack_known_word_and_errors():
    assert pack_rows(torch.arange(8)[:, None], 4).item() == 0x76543210
    with pytest.raises(ValueError, match="32-bit words"):
        pack_rows(torch.zeros(7, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_rows(torch.full((8, 1), 16), 4)


def test_gptq_v1_zero_convention():
    qw = quantize_weight(torch.randn(16, 64), 4, symmetric=True, granularity="group", group_size=32)
    packed = pack_gptq(qw.q, qw.zero, qw.scale, qw.g_idx, 4)
    assert (packed["qzeros"] == 0x77777777).all()  # symmetric 4-bit: zero 8 stored as 8 - 1
    assert (
        packed["scales"].dtype == torch.float16 and packed["g_idx"].tolist() == [0] * 32 + [1] * 32
    )
    assert torch.equal(dequantize_gptq(**{k: packed[k] for k in packed}, bits=4), qw.dequantize())


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, True), (2, False), (8, False)])
def test_quantlinear_matches_dequantized_weight_and_is_small(bits, symmetric):
    lin = nn.Linear(256, 96, bias=True)
    qw = quantize_weight(lin.weight.data, bits, symmetric, "group", 128)
    ql = QuantLinear.from_quantized(qw, lin.bias.data)
    x = torch.randn(3, 5, 256)
    expect = torch.nn.functional.linear(x, qw.dequantize(), lin.bias.data.half().float())
    torch.testing.assert_close(ql.reference_forward(x), expect, rtol=1e-5, atol=1e-5)
    # the fast kernel (where this CPU has one) runs in bfloat16: close to the same product, not exact
    assert relative_error(ql(x), expect) < 1e-2
    packed_bytes = sum(b.numel() * b.element_size() for n, b in ql.named_buffers() if n != "bias")
    assert 256 * 96 * 4 / packed_bytes > 32 / bits * 0.75  # scales, zeros and g_idx cost a little


# ---- GPTQ ----------------------------------------------------------------------------------------------


def _correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 10  # salient channels
    return x


def test_hessian_accumulates_2_over_n_xtx():
    x = torch.randn(100, 16)
    h = Hessian(16)
    for chunk in x.split(30):
        h.add(chunk)
    torch.testing.assert_close(h.H, 2 * x.t() @ x / 100, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.H, checks.reference_hessian(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "gran,gs,act_order,static",
    [
        ("group", 32, False, False),
        ("group", 32, True, False),
        ("group", 32, True, True),
        ("channel", None, False, False),
        ("channel", None, True, False),
        ("tensor", None, False, False),
    ],
)
def test_gptq_beats_rtn_on_output_error(gran, gs, act_order, static):
    x = _correlated_inputs()
    w = torch.randn(64, 128)
    H = 2 * x.t() @ x / len(x)
    qw, _ = gptq_quantize_weight(
        w, H, bits=3, granularity=gran, group_size=gs, act_order=act_order, static_groups=static
    )
    rtn = quantize_weight(w, 3, True, gran, gs)
    err = lambda wq: ((x @ (wq - w).t()) ** 2).mean().item()  # noqa: E731
    assert err(qw.dequantize()) < 0.7 * err(rtn.dequantize())
    assert qw.q.min() >= 0 and qw.q.max() <= 7
    if act_order and gran == "group" and not static:
        assert (qw.g_idx[1:] < qw.g_idx[:-1]).any(), "act-order should permute the groups"
        assert sorted(torch.bincount(qw.g_idx.long()).tolist()) == [32] * 4


def test_gptq_rejects_bad_inputs():
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(torch.randn(8, 16), torch.eye(8))
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize_weight(torch.randn(8, 16), torch.eye(16), damp=2.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize_weight(torch.randn(8, 16), torch.eye(16), block_size=0)


# ---- AWQ -----------------------------------------------------------------------------------------------


def test_awq_scale_folding_keeps_the_function():
    model = tiny_llama()
    ids = calib_ids(2, 16)
    before = model(input_ids=ids).logits
    block = model.model.layers[0]
    for prev, lins in scale_groups(block):
        s = torch.rand(next(iter(lins.values())).weight.shape[1]) + 0.5
        fold_scales(prev, lins, s)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_awq_scale_search_beats_plain_rtn():
    x = _correlated_inputs(seed=1)
    w = torch.randn(64, 128)
    qargs = dict(bits=3, symmetric=True, granularity="group", group_size=32)
    s, alpha = search_scale(*input_stats(x), [w], qargs)
    err = lambda wq: ((x @ (wq - w).t()) ** 2).mean().item()  # noqa: E731
    awq = quantize_weight(w * s, **qargs).dequantize() / s
    assert alpha > 0 and err(awq) < 0.9 * err(quantize_weight(w, **qargs).dequantize())


def test_awq_errors_from_the_gram_matrix_equal_errors_on_the_tokens():
    x, w = _correlated_inputs(n=300, seed=4), torch.randn(16, 128)
    wq = quantize_weight(w, 3, group_size=32).dequantize()
    _, G = input_stats(x)
    torch.testing.assert_close(
        torch.tensor(_outputs_error(G, [w], [wq])),
        ((x @ (wq - w).t()) ** 2).mean(),
        rtol=1e-4,
        atol=0,
    )
    qargs = dict(bits=3, symmetric=True, granularity="group", group_size=32)
    ratio = search_clip(G, w, qargs)
    clipped = quantize_weight(w, clip_ratio=ratio, **qargs).dequantize()
    assert ratio.shape == (16, 4) and (ratio <= 1).all() and (ratio > 0.5).all()
    assert _outputs_error(G, [w], [clipped]) <= _outputs_error(G, [w], [wq]) + 1e-9


def test_awq_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="supported layouts"):
        scale_groups(nn.Sequential(nn.Linear(4, 4)))


# ---- whole models --------------------------------------------------------------------------------------


def _kl(ref_logits, logits):
    p = torch.log_softmax(ref_logits, -1)
    return (p.exp() * (p - torch.log_softmax(logits, -1))).sum(-1).mean().item()


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_and_awq_beat_rtn_on_a_model(bits):
    ref = tiny_llama()
    calib, test_ids = calib_ids(16, 32), calib_ids(4, 32, seed=1)
    ref_logits = ref(input_ids=test_ids).logits
    kls = {}
    for name, fn in (
        ("rtn", lambda m: rtn_quantize_model(m, bits, 64)),
        ("gptq", lambda m: gptq_quantize_model(m, calib, bits, 64, progress=False)),
        ("awq", lambda m: awq_quantize_model(m, calib, bits, 64, progress=False)),
    ):
        model = copy.deepcopy(ref)
        results = fn(model)
        assert len(results) == 2 * 7
        kls[name] = _kl(ref_logits, model(input_ids=test_ids).logits)
    assert kls["gptq"] < kls["rtn"] and kls["awq"] < kls["rtn"], kls


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_include_head_unties_and_quantizes_only_the_output_projection(method):
    model = tiny_llama()
    emb = model.model.embed_tokens.weight.detach().clone()
    fn = {
        "rtn": lambda m: rtn_quantize_model(m, 4, 64, include_head=True),
        "gptq": lambda m: gptq_quantize_model(
            m, calib_ids(4, 16), 4, 64, include_head=True, progress=False
        ),
        "awq": lambda m: awq_quantize_model(
            m, calib_ids(4, 16), 4, 64, include_head=True, progress=False
        ),
    }[method]
    results = fn(model)
    assert "lm_head" in results and len(results) == 2 * 7 + 1
    assert (
        model.lm_head.weight is not model.model.embed_tokens.weight
        and not model.config.tie_word_embeddings
    )
    # the lookup stays float
    torch.testing.assert_close(model.model.embed_tokens.weight, emb, rtol=0, atol=0)
    torch.testing.assert_close(
        model.lm_head.weight, results["lm_head"].dequantize(), rtol=0, atol=1e-6
    )


def test_sequential_groups_follow_the_forward_pass():
    from labkit.quant.walk import block_inputs, find_linears, run_block, sequential_groups

    model = tiny_llama()
    inputs = block_inputs(model, calib_ids(4, 16), batch_size=2)
    assert len(inputs) == 2
    block = model.model.layers[0]
    groups = sequential_groups(block, find_linears(block), inputs)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # running the cached inputs block by block reproduces the full model's hidden states
    hidden = model(input_ids=calib_ids(4, 16)[:2], output_hidden_states=True).hidden_states
    torch.testing.assert_close(
        run_block(model.model.layers[0], inputs)[0][0][0], hidden[1], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_static_groups_keep_groups_contiguous(true_sequential):
    model = tiny_llama()
    results = gptq_quantize_model(
        model,
        calib_ids(8, 32),
        4,
        64,
        act_order=True,
        static_groups=True,
        true_sequential=true_sequential,
        progress=False,
    )
    for qw in results.values():
        assert torch.equal(qw.g_idx, torch.arange(qw.q.shape[1], dtype=torch.int32) // 64)


def test_gptq_static_groups_use_the_original_weights_ranges():
    x = _correlated_inputs(seed=2)
    w = torch.randn(32, 128)
    qw, _ = gptq_quantize_weight(
        w, 2 * x.t() @ x / len(x), 4, group_size=64, act_order=True, static_groups=True
    )
    torch.testing.assert_close(qw.scale, quantize_weight(w, 4, group_size=64).scale)


@pytest.mark.parametrize("act_order,gs", [(False, 64), (True, 64), (False, None)])
def test_export_load_roundtrip_matches_fake_quant(tmp_path, act_order, gs):
    model = tiny_llama()
    results = gptq_quantize_model(
        model,
        calib_ids(8, 32),
        4,
        gs,
        granularity="group" if gs else "channel",
        act_order=act_order,
        progress=False,
    )
    out = export_gptq(model, results, tmp_path / "q")
    loaded, _ = load_gptq(out, device="cpu")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == 4
    assert qc["group_size"] == (gs or -1) and qc["desc_act"] == act_order and qc["sym"] is True
    # the exported model computes with fp16-rounded norms/embeddings: do the same to the reference
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.rsplit(".", 1)[0] not in results:
                p.copy_(p.half().float())
    ids = calib_ids(2, 16, seed=3)
    packed = pack_model(copy.deepcopy(model), results)
    for quantized, reference in ((loaded, ref), (packed, model)):
        expect = reference(input_ids=ids).logits
        use_fast_kernels(quantized, False)  # the readable unpack path: exact up to float rounding
        torch.testing.assert_close(quantized(input_ids=ids).logits, expect, rtol=1e-4, atol=1e-4)
        use_fast_kernels(quantized, True)  # bfloat16 kernels: close, not exact
        assert relative_error(quantized(input_ids=ids).logits, expect) < 2e-2


def use_fast_kernels(model, fast: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.fast = fast


def relative_error(actual: torch.Tensor, expect: torch.Tensor) -> float:
    return ((actual - expect).norm() / expect.norm()).item()


def test_export_rejects_quantized_head(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="output head"):
        export_gptq(model, rtn_quantize_model(model, 4, 64, include_head=True), tmp_path)


# ---- PTQ -----------------------------------------------------------------------------------------------


def test_torch_ao_dynamic_and_static_int8():
    ref = tiny_llama()
    ids = calib_ids(4, 32, seed=2)
    ref_logits = ref(input_ids=ids).logits
    dyn = dynamic_int8(ref)
    stat = static_int8(ref, calib_ids(8, 32), progress=False)
    assert isinstance(dyn.model.layers[0].mlp.down_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(stat.model.layers[0].mlp.down_proj.linear, torch.ao.nn.quantized.Linear)
    assert isinstance(dyn.lm_head, nn.Linear)  # the tied head stays float
    for m in (dyn, stat):
        assert _kl(ref_logits, m(input_ids=ids).logits) < 0.05


# ---- exercise checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check,reference,wrong",
    [
        (
            checks.check_quantize_symmetric,
            quantize_symmetric,
            lambda x, b: (torch.round(x), x.abs().max()),
        ),
        (
            checks.check_quantize_asymmetric,
            quantize_asymmetric,
            lambda x, b: quantize_symmetric(x, b) + (0,),
        ),
        (
            checks.check_fake_quantize_groups,
            checks.reference_fake_quantize_groups,
            lambda w, b, g: w,
        ),
        (
            checks.check_int8_linear_dynamic,
            checks.reference_int8_linear_dynamic,
            lambda x, wq, s: x @ wq.float().t(),
        ),
        (checks.check_hessian, checks.reference_hessian, lambda x: x.t() @ x),
        (checks.check_awq_scales, checks.reference_awq_scales, lambda m, a: m**a),
    ],
)
def test_checks_accept_reference_and_reject_wrong(check, reference, wrong, capsys):
    assert check(reference) is reference
    assert "[ok]" in capsys.readouterr().out
    assert check(wrong) is not wrong
    assert "[x]" in capsys.readouterr().out

    def unsolved(*args):
        raise NotImplementedError

    assert check(unsolved) is not unsolved
    assert "[ ]" in capsys.readouterr().out
