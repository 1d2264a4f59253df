"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by how the layer's inputs correlate.

For a linear layer y = W x, minimising the output error ||W X - W_hat X||^2 over calibration inputs X is
a quadratic problem with Hessian H = 2 X X^T (one [in, in] matrix shared by all output rows). Quantizing
column j with error e_j, the optimal change to the remaining columns is -e_j / [H^-1]_jj * [H^-1]_j,rest
(Optimal Brain Surgeon). GPTQ makes that practical:

- the same column order for every row, so H^-1 is shared and updated once per column;
- a Cholesky factor of H^-1 holds every row of the shrinking inverses at once (numerically stable);
- damping: H += damp * mean(diag H) * I, because X X^T from a few thousand tokens is ill-conditioned;
- lazy batches: updates inside a block of 128 columns are applied immediately, the rest of the matrix
  is updated once per block (a matmul instead of 128 rank-1 updates);
- groups: a fresh (scale, zero) every group_size columns, fitted to the *already updated* weights
  when the group starts (the reference code fits them to the weights as of the last lazy update;
  with block_size == group_size, the default, that is the same thing);
- act-order (desc_act): quantize columns with the largest H_jj (the most active inputs) first, while
  the most freedom remains to compensate their error. Groups then follow the quantization order and
  g_idx records each column's group (non-monotonic). static_groups instead fits every group's
  (scale, zero) to the original weights up front, so groups stay contiguous (g_idx = col // group_size,
  the same fast kernels as without act-order): GPTQModel's static_groups, llm-compressor's
  actorder="weight"/"static" (its default);
- true sequential: inside a block, quantize the linears in forward order, group by group (q/k/v, then
  o, then gate/up, then down), so each group's Hessian sees the inputs the quantized earlier groups
  produce, as the paper's code and GPTQModel do.

Per-channel quantization fits one (scale, zero) per row to the whole row before the first column, as
the reference does; dead inputs (H_jj = 0, never active in calibration) get H_jj = 1 and weight 0.
"""

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .calibration import block_inputs, hooked, run_block, run_calibration, sequential_groups
from .layers import (
    check_scheme,
    find_blocks,
    find_linears,
    get_weight,
    set_weight,
    untie_output_head,
)
from .primitives import (
    QuantizedWeight,
    check_weight,
    dequantize_values,
    quantize_values,
    scale_zero_from_range,
)
from .scheme import QuantScheme, as_scheme, pop_scheme_fields


class Hessian:
    """Running H = 2/n * sum x x^T over every token seen (float64 would be safer, float32 is enough here)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = (2 / self.n) ** 0.5 * x
        self.H += x.t() @ x


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ gets there (the QuantScheme says what the weights become)."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy update
    static_groups: bool = False  # groups' ranges fitted to the original weights up front
    true_sequential: bool = True  # inside a block, later linears see the quantized earlier ones
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self):
        if not 0 <= self.damp < 1:
            raise ValueError(
                f"damp is a fraction of the mean diagonal, 0 <= damp < 1; got {self.damp}"
            )
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def gptq_settings(
    bits: QuantScheme | int, options: GPTQOptions | None, loose: dict
) -> tuple[QuantScheme, GPTQOptions]:
    """(scheme, options) from a GPTQ call: new-style objects, or the loose keyword form from before them
    (group_size=64, act_order=True, damp=0.01...), which keeps working. An unknown keyword is a TypeError."""
    scheme = as_scheme(bits, **pop_scheme_fields(loose))
    return scheme, replace(options or GPTQOptions(), **loose)


def _params(w: torch.Tensor, bits: int, symmetric: bool, per_tensor: bool):
    lo, hi = (
        (w.min().reshape(1, 1), w.max().reshape(1, 1))
        if per_tensor
        else (w.amin(1, keepdim=True), w.amax(1, keepdim=True))
    )
    scale, zero = scale_zero_from_range(lo, hi, bits, symmetric)
    return scale.expand(w.shape[0], 1), zero.expand(w.shape[0], 1)


# ---- the three ways columns share a (scale, zero) -------------------------------------------------
# Each answers at(col, ...) -> the (scale, zero) [out, 1] to quantize column `col` (in quantization
# order) with, and ranges() -> (scales, zeros, group of each column in quantization order) at the end.


class WholeRows:
    """Per-channel (or per-tensor): one range per row (or one in all), fitted to the whole weight before
    the first column moves, as the reference does."""

    def __init__(self, W: torch.Tensor, scheme: QuantScheme, per_tensor: bool):
        self.scale, self.zero = _params(W, scheme.bits, scheme.symmetric, per_tensor)

    def at(self, col: int, block_rest: torch.Tensor, after_block: torch.Tensor):
        return self.scale, self.zero

    def ranges(self, perm: torch.Tensor):
        zeros = torch.zeros_like(perm, dtype=torch.int32)
        return torch.cat([self.scale], 1), torch.cat([self.zero], 1), zeros


class DynamicGroups:
    """A fresh range every group_size columns, fitted to the weights as GPTQ has updated them when the
    group starts (the columns left in this block, then those after it). With act-order the groups follow
    the quantization order, so g_idx is non-monotonic."""

    def __init__(self, scheme: QuantScheme, group_size: int):
        self.scheme, self.group_size = scheme, group_size
        self.scales: list[torch.Tensor] = []
        self.zeros: list[torch.Tensor] = []

    def at(self, col: int, block_rest: torch.Tensor, after_block: torch.Tensor):
        if col % self.group_size == 0:
            upcoming = torch.cat([block_rest, after_block], dim=1)[:, : self.group_size]
            scale, zero = _params(upcoming, self.scheme.bits, self.scheme.symmetric, False)
            self.scales.append(scale)
            self.zeros.append(zero)
        return self.scales[-1], self.zeros[-1]

    def ranges(self, perm: torch.Tensor):
        position = torch.arange(len(perm), device=perm.device)
        return torch.cat(self.scales, 1), torch.cat(self.zeros, 1), position // self.group_size


class StaticGroups:
    """Every group's range fitted to the original weights up front, before any column moves, so groups
    stay contiguous in the original order (g_idx = col // group_size, the fast kernels' layout) even with
    act-order: GPTQModel's static_groups, llm-compressor's actorder="weight"/"static"."""

    def __init__(self, W: torch.Tensor, scheme: QuantScheme, group_size: int, perm: torch.Tensor):
        g = W.reshape(W.shape[0], W.shape[1] // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        self.scale, self.zero = scale_zero_from_range(lo, hi, scheme.bits, scheme.symmetric)
        self.group_size = group_size
        self.group_at = (
            perm // group_size
        ).tolist()  # the group of the column quantized at each step

    def at(self, col: int, block_rest: torch.Tensor, after_block: torch.Tensor):
        g = self.group_at[col]
        return self.scale[:, g : g + 1], self.zero[:, g : g + 1]

    def ranges(self, perm: torch.Tensor):
        return torch.cat([self.scale], 1), torch.cat([self.zero], 1), perm // self.group_size


Grouping = WholeRows | DynamicGroups | StaticGroups


# ---- one weight -------------------------------------------------------------------------------------


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: QuantScheme | int = 4,
    options: GPTQOptions | None = None,
    **loose,
) -> tuple[QuantizedWeight, float]:
    """GPTQ one weight [out, in] given its input Hessian [in, in]. Returns (codes, squared-error proxy).

    gptq_quantize_weight(w, H, QuantScheme(4, 64, act_order=True), GPTQOptions(damp=0.01)), or the loose
    form gptq_quantize_weight(w, H, 4, group_size=64, act_order=True, damp=0.01)."""
    scheme, options = gptq_settings(bits, options, loose)
    W, H = _without_dead_inputs(check_weight(w), H)
    n = W.shape[1]
    gs = scheme.columns_per_group(n)
    perm = (
        torch.argsort(torch.diag(H), descending=True)
        if scheme.act_order
        else torch.arange(n, device=W.device)
    )
    grouping: Grouping
    if gs in (0, n):
        grouping = WholeRows(W, scheme, per_tensor=gs == 0)
    elif options.static_groups:
        grouping = StaticGroups(W, scheme, gs, perm)
    else:
        grouping = DynamicGroups(scheme, gs)
    W, H = W[:, perm], H[perm][:, perm]
    codes, loss = _quantize_columns(
        W, _inverse_factor(H, options.damp), grouping, scheme.bits, options.block_size
    )
    scale, zero, group_of_position = grouping.ranges(perm)
    invperm = torch.argsort(perm)
    qw = QuantizedWeight(
        q=codes[:, invperm],
        scale=scale,
        zero=zero,
        g_idx=group_of_position.to(torch.int32)[invperm],
        bits=scheme.bits,
        group_size=gs,
        symmetric=scheme.symmetric,
    )
    return qw, loss


def _without_dead_inputs(w: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float copies of w and H; inputs that were always zero (H_jj = 0) get H_jj = 1 and weight 0: their
    weight is irrelevant, and H must be invertible."""
    W = w.detach().float().clone()
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features {n}")
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: its row j holds what column j's
    error is spread by onto the columns after it."""
    n = H.shape[0]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(n, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _quantize_columns(
    W: torch.Tensor, Hinv: torch.Tensor, grouping: Grouping, bits: int, block_size: int
) -> tuple[torch.Tensor, float]:
    """The GPTQ loop over W's columns (already in quantization order), updating W in place: quantize
    a column, spread its error over the columns after it in the block at once, and over the rest of the
    matrix once per block (lazy batches). Returns (codes, squared-error proxy)."""
    out_f, n = W.shape
    codes = torch.zeros(out_f, n, dtype=torch.int32, device=W.device)
    loss = 0.0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            scale, zero = grouping.at(i1 + i, W1[:, i:], W[:, i2:])
            w_col, d = W1[:, i : i + 1], Hinv1[i, i]
            q = quantize_values(w_col, scale, zero, bits)
            codes[:, i1 + i] = q[:, 0]
            err = (w_col - dequantize_values(q, scale, zero)) / d
            loss += (err**2).sum().item() / 2
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]  # compensate inside the block right away
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of everything after the block
    return codes, loss


@torch.no_grad()
def gptq_quantize_model(
    model,
    calib: torch.Tensor,
    bits: QuantScheme | int = 4,
    group_size: int | None = 128,
    *,
    options: GPTQOptions | None = None,
    include_head: bool = False,
    progress: bool = True,
    **loose,
) -> dict[str, QuantizedWeight]:
    """GPTQ every linear of the decoder blocks in place (fake-quantized floats), block by block:
    gptq_quantize_model(model, calib, QuantScheme(4, 64), options=GPTQOptions(static_groups=True)),
    or the loose form gptq_quantize_model(model, calib, 4, 64, static_groups=True).

    The calibration text's hidden states are captured once at the first block; each block is then run
    on the outputs of the blocks already *quantized*, so later blocks also correct errors made earlier.
    With true_sequential, that also holds inside a block (see sequential_groups). With include_head the
    output head is untied from the embedding (untie_output_head) and quantized last, from the inputs
    the quantized model gives it. calib: token ids [n_samples, seq_len].
    """
    scheme, options = gptq_settings(bits, options, {"group_size": group_size, **loose})
    check_scheme(model, scheme, include_head)
    blocks_name, blocks = find_blocks(model)
    results = {}

    def quantize(linears: dict, hessians: dict, label) -> None:
        for name, layer in linears.items():
            qw, _ = gptq_quantize_weight(get_weight(layer), hessians[name].H, scheme, options)
            set_weight(layer, qw.dequantize())
            results[name] = qw
            bar.set_postfix_str(label(name))
            bar.update()

    n_linears = sum(len(find_linears(b)) for b in blocks) + int(include_head)
    bar = tqdm(total=n_linears, desc=f"GPTQ {scheme.bits}-bit", disable=not progress)
    inputs = block_inputs(model, calib, options.batch_size)
    for i, block in enumerate(blocks):
        linears = find_linears(block, f"{blocks_name}.{i}.")
        sequential = options.true_sequential
        groups = sequential_groups(block, linears, inputs) if sequential else [list(linears)]
        for group in groups:
            subset = {name: linears[name] for name in group}
            hessians = {
                name: Hessian(get_weight(m).shape[1], get_weight(m).device)
                for name, m in subset.items()
            }
            with hooked(
                subset, lambda name, x, h=hessians: h[name].add(x), stop_after=subset[group[-1]]
            ):
                # stops right after the group's last linear: that is all we need
                run_block(block, inputs)
            quantize(subset, hessians, lambda name: name.split(".", 2)[-1])
        inputs = run_block(block, inputs)  # the quantized block's outputs feed the next block
    if include_head:
        name, head = untie_output_head(model)
        hessians = {name: Hessian(get_weight(head).shape[1], get_weight(head).device)}
        with hooked({name: head}, lambda n, x: hessians[n].add(x), stop_after=head):
            run_calibration(model, calib, options.batch_size)
        quantize({name: head}, hessians, lambda n: n)
    bar.close()
    return results
