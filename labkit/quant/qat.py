"""Quantization-aware training (QAT): fine-tune the model *through* the quantizer it will be deployed with.

Post-training quantization (RTN, GPTQ, AWQ) keeps the trained weights and only chooses how to round them,
and the fewer the bits, the more any rounding costs: on the Austen model (benchmarks/results/qat.json,
groups of 64) 3-bit RTN and GPTQ add 2.4% and 1.0% to the held-out perplexity, 2-bit 12.5% and 7.4%.
QAT lets the weights move to where the grid is: every forward pass uses the quantized weight

    w_hat = fake_quantize(w)          (the same group-wise quantizer RTN uses: primitives.quantize_weight)

so the loss is the quantized model's loss. Rounding has zero gradient almost everywhere, so training
needs the straight-through estimator (STE, Bengio et al. 2013): the backward pass treats rounding as the
identity, d w_hat / d w = 1, except where w falls outside the grid's range and is clamped (gradient 0,
as torch.ao's FakeQuantize does). The float weight w is a "latent" weight that only the optimizer sees;
the scales are refitted to it every step, as RTN would fit them.

After training, `convert_qat_model` puts ordinary linears back and runs `rtn_quantize_model` on the
trained weights: the result is the same fake-quantized model (and, with pack_model, the same packed
QuantLinears) that PTQ produces, evaluated along the same path.

Scale: the course fine-tunes a 5.5M model whose float tied embedding (38% of its parameters) trains too;
what QAT recovers there does not carry over to LLM scale, where the embedding is a few percent.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train import adamw, lr_at, random_batch
from .layers import check_scheme, quantizable_layers
from .primitives import QuantizedWeight, quantize_weight
from .rtn import rtn_quantize_model
from .scheme import QuantScheme, as_scheme


def ste_fake_quantize(
    w: torch.Tensor,
    bits: QuantScheme | int,
    group_size: int | None = 128,
    symmetric: bool = True,
) -> torch.Tensor:
    """RTN's quantize-dequantize of a weight [out, in] in the forward pass; identity gradient (STE)
    for the weights inside the grid's range, zero for those the quantizer clamps."""
    scheme = as_scheme(bits, group_size=group_size, symmetric=symmetric)
    qw = quantize_weight(w.detach(), scheme)
    idx = qw.g_idx.long()
    unclamped = torch.round(w.detach() / qw.scale[:, idx]) + qw.zero[:, idx]
    inside = (unclamped >= 0) & (unclamped <= 2**scheme.bits - 1)
    # forward: exactly w_hat (the added term is 0); backward: upstream gradient where inside, else 0
    return qw.dequantize().to(w.dtype) + (w - w.detach()) * inside


class FakeQuantLinear(nn.Module):
    """A linear layer that trains a float weight but computes with its quantized version."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        if type(linear) is not nn.Linear:
            raise TypeError(f"QAT swaps nn.Linear layers, got {type(linear).__name__}")
        self.scheme = scheme
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: trained in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ste_fake_quantize(self.weight, self.scheme), self.bias)

    def to_linear(self) -> nn.Linear:
        out_f, in_f = self.weight.shape
        linear = nn.Linear(in_f, out_f, bias=self.bias is not None, device=self.weight.device)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        bits, group_size = self.scheme.bits, self.scheme.group_size
        return f"in_features={in_f}, out_features={out_f}, bits={bits}, group_size={group_size}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare_qat(
    model: nn.Module,
    bits: QuantScheme | int,
    group_size: int | None = 128,
    symmetric: bool = True,
) -> nn.Module:
    """Swap every linear of the decoder blocks (the layers rtn_quantize_model quantizes) for a
    FakeQuantLinear, in place: prepare_qat(model, QuantScheme(3, 32)), or the loose form
    prepare_qat(model, 3, 32). The embedding, norms and tied output head stay float, as in PTQ."""
    scheme = as_scheme(bits, group_size=group_size, symmetric=symmetric)
    check_scheme(model, scheme)
    for _, linears in quantizable_layers(model):
        for name, layer in linears.items():
            _replace(model, name, FakeQuantLinear(layer, scheme))
    return model


def qat_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@dataclass(frozen=True)
class QATSchedule:
    """The fine-tuning run: steps, batches of `batch` random windows of `seq_len` tokens, AdamW at `lr`
    after `warmup` steps of warm-up, then cosine; `seed` draws the windows; a loss line every `log_every`."""

    steps: int
    batch: int = 8
    seq_len: int = 256
    lr: float = 2e-4
    warmup: int = 10
    seed: int = 0
    log_every: int = 0  # 0: silent


def train_qat(
    model: nn.Module,
    train_ids: torch.Tensor,
    steps: QATSchedule | int,
    batch: int = 8,
    seq_len: int = 256,
    lr: float = 2e-4,
    teacher: nn.Module | None = None,
    **schedule,
) -> list[float]:
    """Fine-tune a prepared model on random windows of train_ids [n]; returns the loss of every step.
    train_qat(model, ids, QATSchedule(200, lr=1e-3), teacher=float_model), or the loose form
    train_qat(model, ids, 200, 8, 256, 1e-3, warmup=4, teacher=float_model).

    The loop of labkit.train (AdamW, warmup then cosine, gradient clipping), at a fine-tuning learning
    rate: the weights only need to move a fraction of a grid step. With a teacher (the float model) the
    loss is the KL divergence from the teacher's next-token distribution (knowledge distillation, LLM-QAT's
    loss too, though LLM-QAT distils on text the float model generates, not on training text): a target at
    every position over the whole vocabulary, not one token, so the few steps we can afford carry far more
    signal, and nothing pulls the model away from the float one. Every parameter trains, the float
    embedding (tied to the output head) and norms included."""
    run = (
        steps
        if isinstance(steps, QATSchedule)
        else QATSchedule(steps, batch, seq_len, lr, **schedule)
    )
    if not qat_layers(model):
        raise ValueError("no FakeQuantLinear in the model: call prepare_qat(model, bits) first")
    gen = torch.Generator().manual_seed(run.seed)
    opt = adamw(model, run.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(run.steps):
        x = random_batch(train_ids, run.batch, run.seq_len, gen).to(next(model.parameters()).device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, run.steps, run.lr, min(run.warmup, run.steps))
        loss = (
            distillation_loss(model, teacher, x) if teacher else model(input_ids=x, labels=x).loss
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if run.log_every and (step + 1) % run.log_every == 0:
            print(f"QAT step {step + 1}/{run.steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def distillation_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on a batch of token ids [batch, seq]."""
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
    logp = F.log_softmax(student(input_ids=x).logits.float(), dim=-1)
    return F.kl_div(
        logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
    )


@torch.no_grad()
def convert_qat_model(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Put ordinary linears back and RTN-quantize the trained weights in place (the PTQ path).

    Returns the codes, ready for pack_model / export_gptq, like rtn_quantize_model."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("no FakeQuantLinear in the model: nothing to convert")
    schemes = {m.scheme for m in layers.values()}
    if len(schemes) != 1:
        raise ValueError(f"one quantization scheme per model, got {schemes}")
    for name, layer in layers.items():
        _replace(model, name, layer.to_linear())
    return rtn_quantize_model(model, schemes.pop())
