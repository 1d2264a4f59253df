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

import torch
from tqdm.auto import tqdm

from .calibration import block_inputs, hooked, run_block, run_calibration, sequential_groups
from .layers import find_blocks, find_linears, get_weight, set_weight, untie_output_head
from .primitives import (
    QuantizedWeight,
    check_bits,
    check_weight,
    dequantize_values,
    quantize_values,
    resolve_group_size,
    scale_zero_from_range,
)


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
    lo, hi = (
        (w.min().reshape(1, 1), w.max().reshape(1, 1))
        if per_tensor
        else (w.amin(1, keepdim=True), w.amax(1, keepdim=True))
    )
    scale, zero = scale_zero_from_range(lo, hi, bits, symmetric)
    return scale.expand(w.shape[0], 1), zero.expand(w.shape[0], 1)


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    symmetric: bool = True,
    granularity: str = "group",
    group_size: int | None = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
) -> tuple[QuantizedWeight, float]:
    """GPTQ one weight [out, in] given its input Hessian [in, in]. Returns (codes, squared-error proxy)."""
    check_bits(bits)
    W = check_weight(w).detach().float().clone()
    out_f, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features {n}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp is a fraction of the mean diagonal, 0 <= damp < 1; got {damp}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive integer (columns per lazy update), got {block_size!r}"
        )
    gs = resolve_group_size(n, granularity, group_size)
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: weight irrelevant, make H invertible
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = (
        torch.argsort(torch.diag(H), descending=True)
        if act_order
        else torch.arange(n, device=W.device)
    )
    static = static_groups and 0 < gs < n
    if static:  # every group's (scale, zero) from the original weights, before any column moves
        g = W.reshape(out_f, n // gs, gs)
        static_scale, static_zero = scale_zero_from_range(g.amin(-1), g.amax(-1), bits, symmetric)
        group_at = (perm // gs).tolist()  # the original group of the column quantized at each step
        scales, zeros = [static_scale], [static_zero]
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_f, n, dtype=torch.int32, device=W.device)
    if gs in (0, n):  # one (scale, zero) per row or per tensor, fitted once up front
        scale, zero = _params(W, bits, symmetric, per_tensor=gs == 0)
        scales, zeros = [scale], [zero]
    elif not static:
        scales, zeros = [], []
    loss = 0.0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                group = group_at[col]
                scale, zero = static_scale[:, group : group + 1], static_zero[:, group : group + 1]
            elif 0 < gs < n and col % gs == 0:  # new group: fit it to the weights as updated so far
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = _params(upcoming, bits, symmetric, per_tensor=False)
                scales.append(scale)
                zeros.append(zero)
            w_col, d = W1[:, i : i + 1], Hinv1[i, i]
            q = quantize_values(w_col, scale, zero, bits)
            codes[:, col] = q[:, 0]
            err = (w_col - dequantize_values(q, scale, zero)) / d
            loss += (err**2).sum().item() / 2
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]  # compensate inside the block right away
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of everything after the block

    invperm = torch.argsort(perm)
    if gs in (0, n):
        group_of_position = torch.zeros(n, dtype=torch.int32, device=W.device)
    else:  # static: each column keeps its original group; dynamic: groups follow the quantization order
        group_of_position = ((perm if static else torch.arange(n, device=W.device)) // gs).to(
            torch.int32
        )
    qw = QuantizedWeight(
        q=codes[:, invperm],
        scale=torch.cat(scales, 1),
        zero=torch.cat(zeros, 1),
        g_idx=group_of_position[invperm],
        bits=bits,
        group_size=gs,
        symmetric=symmetric,
    )
    return qw, loss


@torch.no_grad()
def gptq_quantize_model(
    model,
    calib: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    granularity: str = "group",
    symmetric: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    true_sequential: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    include_head: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """GPTQ every linear of the decoder blocks in place (fake-quantized floats), block by block.

    The calibration text's hidden states are captured once at the first block; each block is then run
    on the outputs of the blocks already *quantized*, so later blocks also correct errors made earlier.
    With true_sequential, that also holds inside a block (see sequential_groups). With include_head the
    output head is untied from the embedding (untie_output_head) and quantized last, from the inputs
    the quantized model gives it. calib: token ids [n_samples, seq_len].
    """
    blocks_name, blocks = find_blocks(model)
    results = {}
    qargs = dict(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group_size,
        act_order=act_order,
        damp=damp,
        block_size=block_size,
        static_groups=static_groups,
    )

    def quantize(linears: dict, hessians: dict, label) -> None:
        for name, layer in linears.items():
            qw, _ = gptq_quantize_weight(get_weight(layer), hessians[name].H, **qargs)
            set_weight(layer, qw.dequantize())
            results[name] = qw
            bar.set_postfix_str(label(name))
            bar.update()

    n_linears = sum(len(find_linears(b)) for b in blocks) + int(include_head)
    bar = tqdm(total=n_linears, desc=f"GPTQ {bits}-bit", disable=not progress)
    inputs = block_inputs(model, calib, batch_size)
    for i, block in enumerate(blocks):
        linears = find_linears(block, f"{blocks_name}.{i}.")
        groups = sequential_groups(block, linears, inputs) if true_sequential else [list(linears)]
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
            run_calibration(model, calib, batch_size)
        quantize({name: head}, hessians, lambda n: n)
    bar.close()
    return results
