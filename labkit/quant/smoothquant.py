"""SmoothQuant (Xiao et al., 2023): move the outliers out of the activations and into the weights.

Per-tensor INT8 activations fail on a transformer because a few input channels are far larger than
the rest (w8a8.py). Per-channel activation scales would fix it but cannot be used in an integer matmul:
channel j's scale sits inside the sum over j. SmoothQuant divides channel j of the activation by s_j and
multiplies column j of the weight by s_j, an exact identity in float (folding.py, shared with AWQ):

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

The division is folded into the op that produces X (the RMSNorm weight, or the previous linear's rows),
so it costs nothing at run time. The migration strength alpha splits the difficulty:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

alpha = 1 flattens every activation channel to max 1 (all the difficulty goes to the weights),
alpha = 0 flattens every weight column to max 1 (all of it stays in the activations); the paper uses
0.5 for most models and up to 0.75-0.85 where outliers are extreme. After smoothing, plain per-tensor
W8A8 (w8a8.w8a8_model) works. max|X_j| comes from calibration data (activation_absmax).
"""

import torch
import torch.nn as nn

from .calibration import hooked, run_calibration
from .folding import fold_scales, scale_groups
from .layers import find_blocks, get_weight
from .w8a8 import block_linears


@torch.no_grad()
def activation_absmax(model, calib: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{block linear name: max |x| per input channel [in]} over calibration ids [n, seq]."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:  # x [tokens, in]
        m = x.abs().amax(0).float()
        absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

    with hooked(block_linears(model), record):
        run_calibration(model, calib, batch_size)
    return absmax


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (migration strength) must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5):
    """s [in] = max|X_j|^alpha / max|W_j|^(1-alpha), from per-channel maxima of X [in] and W [in]."""
    alpha = check_alpha(alpha)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(
        1 - alpha
    )
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_model(
    model, absmax: dict[str, torch.Tensor], alpha: float = 0.5
) -> dict[str, torch.Tensor]:
    """In place: fold SmoothQuant's scales into every (previous op, linears) pair of every block.

    absmax: activation_absmax of the unsmoothed model. Returns {linear name: s [in]}: the activations of
    those linears are now divided by s (smoothed_absmax), their weights' columns multiplied by it.
    """
    check_alpha(alpha)
    _, blocks = find_blocks(model)
    names = {m: n for n, m in model.named_modules()}
    scales = {}
    for block in blocks:
        for prev, lins in scale_groups(block):
            first = names[next(iter(lins.values()))]
            w = torch.cat([get_weight(m) for m in lins.values()])  # [sum of outs, in]
            s = smoothing_scales(absmax[first], w.abs().amax(0), alpha)
            fold_scales(prev, lins, s.to(w.dtype))
            scales.update({names[m]: s for m in lins.values()})
    return scales


def smoothed_absmax(absmax: dict, scales: dict) -> dict[str, torch.Tensor]:
    """The activation maxima after smoothing: divided by s where a linear was smoothed."""
    return {n: a / scales[n] if n in scales else a for n, a in absmax.items()}


@torch.no_grad()
def smoothing_error(model: nn.Module, smoothed: nn.Module, ids: torch.Tensor) -> float:
    """max |logits(smoothed) - logits(model)| / max |logits(model)| on ids [batch, seq]."""
    ref = model(input_ids=ids).logits.float()
    return ((smoothed(input_ids=ids).logits.float() - ref).abs().max() / ref.abs().max()).item()


def check_smoothing(model, smoothed, ids: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Raise if smoothing (no quantization yet) changed the model's function beyond float rounding."""
    err = smoothing_error(model, smoothed, ids)
    if not err <= tolerance:
        raise ValueError(
            f"smoothing changed the logits by {err:.2e} (relative to their largest), more than "
            f"{tolerance:.0e}: a scale was folded into an op that does not feed that linear"
        )
    return err
