"""AWQ (Lin et al., 2023): activation-aware weight quantization, by scaling channels before rounding.

A few input channels carry much larger activations than the rest, and the weights that multiply them
matter most. Keeping them in 8 bits (a mixed-precision sketch one often sees) would work but needs
special kernels; that is *not* AWQ. AWQ keeps every weight in the same low-bit format and instead uses
an exact identity: for a per-input-channel scale s > 0,

    W x = (W diag(s)) (diag(s)^-1 x)

Multiplying a salient column by s > 1 before quantizing shrinks its *relative* rounding error (the
group's scale grows less than the column does), and dividing the activation by s undoes it for free
because that division is folded into the op that produced x (a LayerNorm/RMSNorm weight, or the rows of
the previous linear). The paper searches s = mean|x|^alpha (per channel) over a grid of alpha in [0, 1),
choosing the alpha that minimises the output error of the quantized layers on calibration data. Then it
searches, per group, how much to clip the weight range (a smaller range rounds the bulk more finely at
the cost of saturating a few outliers), again by output error. Finally all weights are RTN-quantized.

Simplification: the paper's reference code measures the scale search's error at the output of the
whole attention/MLP module; we measure it at the outputs of the linears that share the input, which
needs no knowledge of the attention's inner arguments and keeps this file architecture-agnostic.
"""

import warnings
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .calibration import block_inputs, capture_inputs, run_block, run_calibration
from .folding import fold_scales, scale_groups
from .layers import (
    check_scheme,
    find_blocks,
    find_linears,
    get_weight,
    set_weight,
    untie_output_head,
)
from .primitives import QuantizedWeight, quantize_weight
from .scheme import QuantScheme, as_scheme, pop_scheme_fields

NO_CLIP = (
    "q_proj",
    "k_proj",
    "c_attn",
)  # as in the reference code: clipping q/k hurts attention scores


def input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean |x| per channel, Gram matrix G = X^T X / n) of inputs x [tokens, in].

    The mean squared output error of a weight change D is mean_tokens ||D x||^2 = sum(D G * D): with G
    computed once, each candidate in the searches costs out x in x in instead of out x tokens x in, so
    they can afford every calibration token."""
    x = x.float()
    return x.abs().mean(0), x.t() @ x / len(x)


def _outputs_error(G, weights, quantized):
    """Mean squared error over tokens and output channels of the linears sharing the input with Gram G."""
    return sum(
        (((wq - w) @ G) * (wq - w)).sum(1).mean() for w, wq in zip(weights, quantized)
    ).item()


@dataclass(frozen=True)
class AWQOptions:
    """How AWQ searches (the QuantScheme says what the weights become)."""

    n_grid: int = 20  # alphas tried in the scale search, and clip ratios in the clipping search
    duo_scaling: bool = False  # AutoAWQ's later variant: also divide by the weights' own magnitude
    clip: bool = True  # search each group's clipping range after scaling
    n_tokens: int | None = None  # calibration tokens per input statistic (None: all of them)
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self):
        for name in ("n_grid", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _scheme(scheme: QuantScheme | dict) -> QuantScheme:
    """A QuantScheme; the dict of keyword arguments these searches took before it still works."""
    if isinstance(scheme, dict):
        warnings.warn(
            "pass a QuantScheme (QuantScheme(**qargs)) instead of a dict",
            DeprecationWarning,
            stacklevel=3,
        )
        return QuantScheme(**scheme)
    return scheme


@torch.no_grad()
def search_scale(
    x_mean: torch.Tensor,
    G: torch.Tensor,
    weights: list[torch.Tensor],
    scheme: QuantScheme | dict,
    n_grid: int = 20,
    duo_scaling: bool = False,
) -> tuple[torch.Tensor, float]:
    """Grid-search alpha; returns (s [in], alpha). x_mean, G: input_stats of the input shared by `weights`."""
    scheme = _scheme(scheme)
    w_all = torch.cat(weights, 0)
    w_mean = (w_all.abs() / w_all.abs().amax(1, keepdim=True).clamp(min=1e-6)).mean(0)
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for alpha in [i / n_grid for i in range(n_grid)]:
        s = x_mean.pow(alpha)
        if duo_scaling:  # AutoAWQ's later variant: also divide by the weights' own magnitude
            s = s / w_mean.pow(1 - alpha).add(1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        quantized = [quantize_weight(w * s, scheme).dequantize() / s for w in weights]
        err = _outputs_error(G, weights, quantized)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def search_clip(
    G: torch.Tensor,
    w: torch.Tensor,
    scheme: QuantScheme | dict,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor | float:
    """Per (output row, group) clip ratio in (1 - max_shrink, 1] minimising that group's share of the output error.

    A group's error only involves its own inputs: d G_gg d^T with G_gg the group's diagonal block of the
    Gram matrix. (The reference code uses 512 tokens to keep the search affordable; with G, all of them.)"""
    scheme = _scheme(scheme)
    out_f, in_f = w.shape
    gs = scheme.columns_per_group(in_f) or in_f
    Gg = torch.stack([G[i : i + gs, i : i + gs] for i in range(0, in_f, gs)])  # [groups, gs, gs]
    best_err = torch.full((out_f, in_f // gs), float("inf"))
    best_ratio = torch.ones(out_f, in_f // gs)
    for i in range(int(max_shrink * n_grid)):
        ratio = 1 - i / n_grid
        diff = (quantize_weight(w, scheme, clip_ratio=ratio).dequantize() - w).reshape(
            out_f, in_f // gs, gs
        )
        # [out, groups]
        err = (torch.bmm(diff.transpose(0, 1), Gg) * diff.transpose(0, 1)).sum(-1).t()
        better = err < best_err
        best_err, best_ratio = (
            torch.where(better, err, best_err),
            torch.where(better, ratio, best_ratio),
        )
    if scheme.granularity == "tensor":  # one range for the whole tensor: one ratio
        return best_ratio.flatten().median().item()
    return best_ratio


def _sample(xs: list[torch.Tensor], n_tokens: int | None) -> torch.Tensor:
    x = torch.cat(xs).float()
    if n_tokens is not None and len(x) > n_tokens:
        x = x[torch.linspace(0, len(x) - 1, n_tokens).long()]
    return x


@torch.no_grad()
def awq_quantize_model(
    model,
    calib: torch.Tensor,
    bits: QuantScheme | int = 4,
    group_size: int | None = 128,
    *,
    options: AWQOptions | None = None,
    include_head: bool = False,
    progress: bool = True,
    **loose,
) -> dict[str, QuantizedWeight]:
    """AWQ in place: per block, search and fold scales, search clipping, then RTN-quantize everything:
    awq_quantize_model(model, calib, QuantScheme(4, 64), options=AWQOptions(duo_scaling=True)), or the
    loose form awq_quantize_model(model, calib, 4, 64, duo_scaling=True).

    With include_head the output head is untied from the embedding (walk.untie_output_head) and gets the
    clipping search and RTN only: the reference code leaves lm_head alone, and its input (the final norm)
    is shared with nothing else, so scales could be folded there too, but we keep to the paper.
    Each block is run on cached inputs (walk.block_inputs), the outputs of the blocks before it with
    their scales folded in but not yet quantized, as in the reference implementation.
    """
    scheme = as_scheme(bits, group_size=group_size, **pop_scheme_fields(loose))
    options = replace(options or AWQOptions(), **loose)
    check_scheme(model, scheme, include_head)
    n_grid, n_tokens, batch_size = options.n_grid, options.n_tokens, options.batch_size
    _, blocks = find_blocks(model)
    clip_ratios: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in model.named_modules()}
    block_in = block_inputs(model, calib, batch_size)
    for block in tqdm(blocks, desc=f"AWQ {scheme.bits}-bit", disable=not progress):
        groups = scale_groups(block)
        linears = find_linears(block, names[block] + ".")
        with capture_inputs(linears) as inputs:
            run_block(block, block_in)
        stats = {}  # name -> (x_mean, G); linears reading the same input share them
        for _prev, lins in groups:
            shared = input_stats(_sample(inputs[names[next(iter(lins.values()))]], n_tokens))
            stats.update({names[m]: shared for m in lins.values()})
        for name, xs in inputs.items():
            if name not in stats:
                stats[name] = input_stats(_sample(xs, n_tokens))
        del inputs
        searched = []
        for (
            prev,
            lins,
        ) in groups:  # 1) search every group's scales on the captured (unscaled) inputs
            x_mean, G = stats[names[next(iter(lins.values()))]]
            s, _ = search_scale(
                x_mean,
                G,
                [get_weight(m).float() for m in lins.values()],
                scheme,
                n_grid,
                options.duo_scaling,
            )
            searched.append((prev, lins, s))
        for prev, lins, s in searched:  # 2) fold them in; the inputs those linears see shrink by s
            fold_scales(prev, lins, s.to(get_weight(next(iter(lins.values()))).dtype))
            x_mean, G = stats[names[next(iter(lins.values()))]]
            scaled = (x_mean / s, G / (s[:, None] * s[None, :]))
            stats.update({names[m]: scaled for m in lins.values()})
        if options.clip:  # 3) clipping search on the scaled weights
            for name, m in linears.items():
                if not name.endswith(NO_CLIP):
                    clip_ratios[name] = search_clip(
                        stats[name][1], get_weight(m).float(), scheme, n_grid
                    )
        # scaling kept the block's function: these feed the next block
        block_in = run_block(block, block_in)
    targets = {
        name: m for block in blocks for name, m in find_linears(block, names[block] + ".").items()
    }
    if include_head:
        head_name, head = untie_output_head(model)
        if options.clip:
            with capture_inputs({head_name: head}) as inputs:
                run_calibration(model, calib, batch_size)
            G = input_stats(_sample(inputs[head_name], n_tokens))[1]
            clip_ratios[head_name] = search_clip(G, get_weight(head).float(), scheme, n_grid)
        targets[head_name] = head
    results = {}
    for name, layer in targets.items():  # 4) round to nearest, with the searched clipping
        qw = quantize_weight(get_weight(layer), scheme, clip_ratio=clip_ratios.get(name))
        set_weight(layer, qw.dequantize())
        results[name] = qw
    return results
