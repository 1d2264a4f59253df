"""labkit.quant.qat: the straight-through estimator, the QAT model, its conversion to the PTQ path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.quant import fake_quantize, pack_model
from labkit.quant.qat import (
    FakeQuantLinear,
    convert_qat_model,
    distillation_loss,
    prepare_qat,
    qat_layers,
    ste_fake_quantize,
    train_qat,
)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def ids(n=4, seq=32, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_forward_is_rtn_and_gradient_passes_straight_through(bits, symmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)).requires_grad_()
    w_hat = ste_fake_quantize(w, bits, 32, symmetric)
    assert torch.equal(w_hat, fake_quantize(w.detach(), bits, symmetric, "group", 32))
    upstream = torch.randn_like(w)
    w_hat.backward(upstream)
    # min/max ranges put (almost) every weight inside the grid: the gradient is the upstream one
    assert w.grad is not None
    inside = w.grad != 0
    assert inside.float().mean() > 0.99
    assert torch.equal(w.grad[inside], upstream[inside])


def test_ste_gradient_is_zero_where_the_quantizer_clamps():
    # asymmetric 2-bit, range [-0.75, 0.75]: scale 0.5, zero round(1.5) = 2, so 0.75 -> code 4 > 3: clamped
    w = torch.tensor([[-0.75, 0.0, 0.25, 0.75]], requires_grad=True)
    w_hat = ste_fake_quantize(w, 2, -1, symmetric=False)
    assert w_hat[0, 3].item() == 0.5  # clamped to the top level
    w_hat.backward(torch.ones_like(w))
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_prepare_swaps_the_block_linears_and_shares_their_weights():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    prepare_qat(model, 3, 32)
    layers = qat_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block; the head stays float
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    assert model.model.layers[0].self_attn.q_proj.weight is q_proj.weight


@pytest.mark.parametrize("symmetric", [True, False])
def test_converted_model_computes_what_the_qat_model_computed(symmetric):
    model = prepare_qat(tiny_llama(), 3, 32, symmetric)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # as if trained
        qat_logits = model(input_ids=ids()).logits
    results = convert_qat_model(model)
    assert not qat_layers(model) and len(results) == 14
    assert all(qw.bits == 3 and qw.symmetric == symmetric for qw in results.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, qat_logits)
        pack_model(model, results)  # the packed QuantLinears of the PTQ path
        torch.testing.assert_close(model(input_ids=ids()).logits, qat_logits, atol=1e-4, rtol=1e-4)


def test_a_few_qat_steps_reduce_the_loss_on_a_fixed_batch():
    model = prepare_qat(tiny_llama(), 2, 32)
    stream = torch.randint(0, 256, (34,), generator=torch.Generator().manual_seed(1))
    batch = stream[:32][None]  # a stream of seq_len + 2 tokens: every window is this one
    with torch.no_grad():
        before = model(input_ids=batch, labels=batch).loss.item()
    losses = train_qat(model, stream, steps=15, batch=2, seq_len=32, lr=3e-3, warmup=1)
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss.item()
    assert len(losses) == 15 and losses[0] == pytest.approx(before, rel=1e-4)
    assert after < before - 0.5
    assert not model.training  # left in eval mode


def test_distillation_steps_pull_the_quantized_model_towards_the_teacher():
    teacher = tiny_llama(seed=1)
    model = prepare_qat(tiny_llama(), 2, 32)
    stream = torch.randint(0, 256, (34,), generator=torch.Generator().manual_seed(1))
    batch = stream[:32][None]
    with torch.no_grad():
        before = distillation_loss(model, teacher, batch).item()
    losses = train_qat(model, stream, 15, 2, 32, lr=3e-3, warmup=1, teacher=teacher)
    with torch.no_grad():
        after = distillation_loss(model, teacher, batch).item()
        self_kl = distillation_loss(teacher, teacher, batch).item()
    assert losses[0] == pytest.approx(before, rel=1e-4) and before > 0
    assert after < 0.7 * before
    assert self_kl == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bits", [1, 9, 3.0, True, "3"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        prepare_qat(tiny_llama(), bits, 32)


def test_bad_group_size_and_missing_preparation_raise():
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        prepare_qat(tiny_llama(), 3, 48)
    with pytest.raises(ValueError, match="call prepare_qat"):
        train_qat(tiny_llama(), torch.arange(100), steps=1)
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_qat_model(tiny_llama())
