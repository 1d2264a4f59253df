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
- groups: a fresh (scale, zero) every group_size columns, fitted to the *already updated* weights;
- act-order (desc_act): quantize columns with the largest H_jj (the most active inputs) first, while
  the most freedom remains to compensate their error. g_idx records each column's group afterwards.
"""
import torch
from tqdm.auto import tqdm

from .primitives import (QuantizedWeight, check_bits, check_weight, dequantize_values, quantize_values,
                         resolve_group_size, scale_zero_from_range)
from .walk import find_blocks, get_weight, hooked, quantizable_layers, run_calibration, set_weight


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


def _params(w: torch.Tensor, bits: int, symmetric: bool, per_tensor: bool):
    lo, hi = (w.min().reshape(1, 1), w.max().reshape(1, 1)) if per_tensor else (w.amin(1, keepdim=True), w.amax(1, keepdim=True))
    scale, zero = scale_zero_from_range(lo, hi, bits, symmetric)
    return scale.expand(w.shape[0], 1), zero.expand(w.shape[0], 1)


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, bits: int = 4, symmetric: bool = True,
                         granularity: str = "group", group_size: int | None = 128, act_order: bool = False,
                         damp: float = 0.01, block_size: int = 128) -> tuple[QuantizedWeight, float]:
    """GPTQ one weight [out, in] given its input Hessian [in, in]. Returns (codes, squared-error proxy)."""
    check_bits(bits)
    W = check_weight(w).detach().float().clone()
    out_f, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features {n}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp is a fraction of the mean diagonal, 0 <= damp < 1; got {damp}")
    gs = resolve_group_size(n, granularity, group_size)
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0           # inputs that were always zero: weight irrelevant, make H invertible
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_f, n, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    if gs in (0, n):  # one (scale, zero) per row or per tensor, fitted once up front
        scale, zero = _params(W, bits, symmetric, per_tensor=gs == 0)
        scales.append(scale), zeros.append(zero)
    loss = 0.0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if 0 < gs < n and col % gs == 0:  # new group: fit it to the weights as updated so far
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = _params(upcoming, bits, symmetric, per_tensor=False)
                scales.append(scale), zeros.append(zero)
            w_col, d = W1[:, i:i + 1], Hinv1[i, i]
            q = quantize_values(w_col, scale, zero, bits)
            codes[:, col] = q[:, 0]
            err = (w_col - dequantize_values(q, scale, zero)) / d
            loss += (err ** 2).sum().item() / 2
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]      # compensate inside the block right away
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]          # lazy update of everything after the block

    invperm = torch.argsort(perm)
    group_of_position = torch.zeros(n, dtype=torch.int32, device=W.device) if gs in (0, n) else \
        (torch.arange(n, device=W.device) // gs).to(torch.int32)
    qw = QuantizedWeight(q=codes[:, invperm], scale=torch.cat(scales, 1), zero=torch.cat(zeros, 1),
                         g_idx=group_of_position[invperm], bits=bits, group_size=gs, symmetric=symmetric)
    return qw, loss


@torch.no_grad()
def gptq_quantize_model(model, calib: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                        granularity: str = "group", symmetric: bool = True, act_order: bool = False,
                        damp: float = 0.01, block_size: int = 128, include_head: bool = False,
                        batch_size: int = 8, progress: bool = True) -> dict[str, QuantizedWeight]:
    """GPTQ every linear of the decoder blocks in place (fake-quantized floats), block by block.

    Block k's Hessians come from calibration text run through blocks 0..k-1 *already quantized*, so
    later blocks also correct errors made earlier. calib: token ids [n_samples, seq_len].
    """
    _, blocks = find_blocks(model)
    results = {}
    stages = quantizable_layers(model, include_head)
    bar = tqdm(total=sum(len(l) for _, l in stages), desc=f"GPTQ {bits}-bit", disable=not progress)
    for block_idx, linears in stages:
        device = next(iter(linears.values())).weight.device
        hessians = {name: Hessian(get_weight(m).shape[1], device) for name, m in linears.items()}
        stop = blocks[block_idx] if block_idx is not None else None
        with hooked(linears, lambda name, x: hessians[name].add(x), stop_after=stop):
            run_calibration(model, calib, batch_size)
        for name, layer in linears.items():
            qw, _ = gptq_quantize_weight(get_weight(layer), hessians[name].H, bits, symmetric, granularity,
                                         group_size, act_order, damp, block_size)
            set_weight(layer, qw.dequantize())
            results[name] = qw
            bar.set_postfix_str(name.split(".", 2)[-1] if block_idx is None else name.split(".")[-1])
            bar.update()
    bar.close()
    return results
