"""Exercise checks for notebook 04c (see labkit.checks: each returns the student's function if it is right,
else labkit's reference, so the notebook always runs to the end).

`check_flash_attention` compares the student's tiled loop with `F.scaled_dot_product_attention` in float32,
causal and not, at lengths that no tile size divides; when an answer is wrong it runs the usual mistakes
(flash_attention.MISTAKES) on the same inputs and names the one the answer reproduces.
"""

import torch
import torch.nn.functional as F

from .checks import ExerciseFailure, run_check
from .flash_attention import (
    MISTAKES,
    combine_splits,
    mistaken_flash_attention,
    reference_flash_attention,
    split_kv_partials,
)

# (Nq, Nk, d, causal, block_q, block_k): the first has one key tile, so it needs no rescaling at all
FLASH_CASES = [
    (5, 7, 8, False, 8, 8),
    (37, 53, 16, False, 8, 16),
    (41, 41, 8, True, 16, 8),
    (64, 64, 32, True, 16, 16),
    (1, 100, 16, False, 1, 32),  # one decode query over a long context
]


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v


def flash_inputs(n_q: int, n_k: int, d: int, seed: int) -> Inputs:
    """q, k, v with scores spread wide enough that the running max moves from tile to tile."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, d, generator=gen) * 2
    k = torch.randn(n_k, d, generator=gen) * torch.linspace(0.5, 2.0, n_k)[:, None]
    return q, k, torch.randn(n_k, d, generator=gen)


def diagnose(student_out: torch.Tensor, case: tuple, inputs: Inputs) -> str:
    """What went wrong, in words: a named mistake if the output reproduces one, else the error's size."""
    n_q, n_k, d, causal, block_q, block_k = case
    where = f"Nq={n_q}, Nk={n_k}, d={d}, causal={causal}, block_q={block_q}, block_k={block_k}"
    if not torch.isfinite(student_out).all():
        return (
            f"{where}: your output has inf or NaN; at the first tile the running max is -inf, so "
            f"exp(m_old - m_new) is 0 there, never exp(m_new - m_old); take the exponentials of the "
            f"scores against the updated max"
        )
    for mistake, hint in MISTAKES.items():
        wrong = mistaken_flash_attention(*inputs, causal, block_q, block_k, mistake)
        if torch.allclose(student_out, wrong, rtol=1e-4, atol=1e-5):
            return f"{where}: {hint}"
    if n_k <= block_k:
        return (
            f"{where}: wrong even with a single key tile, where no rescaling happens: check the "
            f"1/sqrt(d) scale, the causal mask and the final division acc / denom"
        )
    want = F.scaled_dot_product_attention(*inputs, is_causal=causal)
    err = (student_out - want).abs().max().item()
    return f"{where}: largest difference from scaled_dot_product_attention {err:.3g}"


def check_flash_attention(student):
    def test(fn):
        for seed, case in enumerate(FLASH_CASES):
            n_q, n_k, d, causal, block_q, block_k = case
            inputs = flash_inputs(n_q, n_k, d, seed)
            want = F.scaled_dot_product_attention(*inputs, is_causal=causal)
            got = fn(*inputs, causal, block_q, block_k)
            if got is None:
                raise ExerciseFailure("your function returned None (did you forget `return`?)")
            if tuple(got.shape) != (n_q, d):
                raise ExerciseFailure(f"expected shape {(n_q, d)}, got {tuple(got.shape)}")
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise ExerciseFailure(diagnose(got, case, inputs))

    return run_check("flash_attention", student, reference_flash_attention, test)


def reference_combine_splits(o, m, denom):
    return combine_splits(o, m, denom)


def check_combine_splits(student):
    def test(fn):
        gen = torch.Generator().manual_seed(0)
        for heads, n, d, splits in [(2, 40, 8, 4), (3, 97, 16, 5), (1, 8, 4, 1)]:
            q = torch.randn(heads, d, generator=gen) * 3
            k = torch.randn(heads, n, d, generator=gen) * torch.linspace(0.2, 2, n)[:, None]
            v = torch.randn(heads, n, d, generator=gen)
            got = fn(*split_kv_partials(q, k, v, splits))
            if got is None:
                raise ExerciseFailure("your function returned None (did you forget `return`?)")
            want = F.scaled_dot_product_attention(q[:, None], k, v)[:, 0]  # [heads, d]
            if tuple(got.shape) != (heads, d):
                raise ExerciseFailure(f"expected shape {(heads, d)}, got {tuple(got.shape)}")
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                err = (got - want).abs().max().item()
                raise ExerciseFailure(
                    f"{splits} splits of {n} keys: largest difference from attention over all keys "
                    f"{err:.3g}; each chunk's o is normalised by its own denom against its own max m, so "
                    f"weigh it by denom * exp(m - max over chunks of m), then divide by the weights' sum"
                )

    return run_check("combine_splits", student, reference_combine_splits, test)
