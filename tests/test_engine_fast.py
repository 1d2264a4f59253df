"""labkit.engine.fast_layers: the fused/pre-packed layer computes what the model's own modules compute, and
anything it does not recognise (a packed QuantLinear) still runs through its own module."""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from labkit import load_model
from labkit.engine import LLM, SamplingParams
from labkit.engine.fast_layers import (
    ONE_ROW_PATHS,
    FastLayer,
    PackedLinears,
    RotaryTable,
    choose_one_row_path,
    fast_rms_norm,
    fused_linear,
    prepacked_linear,
    rotate,
)
from labkit.quant import pack_model, rtn_quantize_model
from labkit.quant.qlinear import fused_kernel


@pytest.fixture(scope="module")
def model_tok():
    return load_model(device="cpu")


def test_fused_linear_equals_separate_linears_with_and_without_bias():
    torch.manual_seed(0)
    parts = [
        torch.nn.Linear(32, 48, bias=True),
        torch.nn.Linear(32, 16, bias=False),
        torch.nn.Linear(32, 8),
    ]
    fused = fused_linear(parts)
    # a batch (the packed, fused weight) and one row, through either one-row path
    for rows, one_row_packed in ((5, False), (1, False), (1, True)):
        if isinstance(fused, PackedLinears):
            fused.one_row_packed = one_row_packed
        x = torch.randn(rows, 32)
        outs = fused(x)
        assert [tuple(o.shape) for o in outs] == [(rows, 48), (rows, 16), (rows, 8)]
        for out, part in zip(outs, parts):
            torch.testing.assert_close(out, part(x), rtol=1e-5, atol=1e-5)


def test_prepacked_linear_matches_or_declines():
    w, b, x = torch.randn(64, 32), torch.randn(64), torch.randn(7, 32)
    run = prepacked_linear(w, b)
    if run is not None:  # a torch build with oneDNN: must agree with F.linear
        torch.testing.assert_close(
            run(x), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4
        )
    assert prepacked_linear(w.double()) is None  # float64 is never pre-packed
    run = prepacked_linear(w.bfloat16())
    if run is not None:  # bfloat16 only where the CPU has bfloat16 instructions
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
        xb = x.bfloat16()
        torch.testing.assert_close(
            run(xb), torch.nn.functional.linear(xb, w.bfloat16()), rtol=2e-2, atol=2e-2
        )


def test_choose_one_row_path_sets_every_linear_alike_and_both_paths_agree():
    torch.manual_seed(0)
    linears = [fused_linear([torch.nn.Linear(64, 96), torch.nn.Linear(64, 32)]) for _ in range(4)]
    if not isinstance(linears[0], PackedLinears):
        pytest.skip("this torch build has no oneDNN pre-packing: there is no second path to choose")
    assert choose_one_row_path([]) is None
    x = torch.randn(1, 64)
    with torch.inference_mode():
        outputs = {}
        for packed in (False, True):
            linears[0].one_row_packed = packed
            outputs[packed] = torch.cat(linears[0](x), dim=-1)
        torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-5, atol=1e-5)
        name = choose_one_row_path(linears, rounds=2)
    assert name in ONE_ROW_PATHS.values()
    assert len({lin.one_row_packed for lin in linears}) == 1
    assert ONE_ROW_PATHS[linears[0].one_row_packed] == name


def test_layer_pieces_match_the_model_modules(model_tok):
    model, _ = model_tok
    layer = model.model.layers[0]
    fast = FastLayer(layer)
    x = torch.randn(6, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            fast.input_norm(x), layer.input_layernorm(x), rtol=1e-5, atol=1e-5
        )
        q, k, v = fast.qkv(x)
        for got, proj in [
            (q, layer.self_attn.q_proj),
            (k, layer.self_attn.k_proj),
            (v, layer.self_attn.v_proj),
        ]:
            torch.testing.assert_close(got, proj(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.mlp(x), layer.mlp(x), rtol=1e-4, atol=1e-4)
        pos = torch.tensor([0, 5, 17, 511])
        cos, sin = RotaryTable(model.model.rotary_emb, 512, torch.float32, "cpu")(x, pos)
        ref_cos, ref_sin = model.model.rotary_emb(x, pos[None])
        torch.testing.assert_close(cos[:, 0], ref_cos[0])
        # q and k rotated together, by a roll, equal Llama's rotate_half form bit for bit
        H, Hkv, D = (
            model.config.num_attention_heads,
            model.config.num_key_value_heads,
            cos.shape[-1],
        )
        q, k = torch.randn(4, H, D), torch.randn(4, Hkv, D)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos[0], ref_sin[0], unsqueeze_dim=1)
        qk = rotate(torch.cat((q, k), dim=1), cos, sin)
        assert torch.equal(qk[:, :H], ref_q) and torch.equal(qk[:, H:], ref_k)
    # unknown norms are kept
    assert fast_rms_norm(torch.nn.LayerNorm(4)).__class__ is torch.nn.LayerNorm


def test_quantlinear_projections_fuse_into_one_kernel_with_the_same_outputs(model_tok):
    model, _ = model_tok
    qmodel = copy.deepcopy(model)
    pack_model(qmodel, rtn_quantize_model(qmodel, bits=4, group_size=128))
    attn, mlp = qmodel.model.layers[0].self_attn, qmodel.model.layers[0].mlp
    x = torch.randn(3, attn.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        assert fused_kernel(group) is not None  # one packed weight for the group
        for got, module in zip(fused_linear(group)(x), group):
            torch.testing.assert_close(got, module(x), rtol=1e-2, atol=1e-2)
    # a layer without a fast kernel (the readable unpack path forced) is not fused: each runs its own
    attn.k_proj.fast = False
    assert fused_kernel([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    for got, module in zip(
        fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])(x),
        (attn.q_proj, attn.k_proj, attn.v_proj),
    ):
        torch.testing.assert_close(got, module(x))


def test_engine_runs_packed_quantlinear_models_like_generate(model_tok):
    model, tok = model_tok
    qmodel = copy.deepcopy(model)
    pack_model(qmodel, rtn_quantize_model(qmodel, bits=4, group_size=128))
    assert type(qmodel.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    prompt = "It is a truth universally acknowledged"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = qmodel.generate(
            **ids,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[0, ids["input_ids"].shape[1] :].tolist()
    out = LLM(qmodel, tokenizer=tok).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert out[0].outputs[0].token_ids == ref
