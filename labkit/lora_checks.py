"""Exercise check for notebook 08d (see labkit.checks: returns the student's function if it is right,
else labkit's reference, so the notebook always runs to the end)."""

import torch

from .checks import ExerciseFailure, run_check


def reference_batched_lora_delta(x, a, b, slots):
    """x [T, in], a [S, r, in], b [S, out, r], slots [T] -> [T, out]: each token's A and B gathered by
    its slot, then a shrink and an expand batched over the tokens (Punica's BGMV, in PyTorch)."""
    shrunk = torch.bmm(a[slots], x[:, :, None])  # [T, r, 1]
    return torch.bmm(b[slots], shrunk)[:, :, 0]  # [T, out]


def per_adapter_loop(x, a, b, slots):
    """The LoRA deltas one adapter at a time: what the batched version must equal."""
    out = x.new_zeros(x.shape[0], b.shape[1])
    for s in range(a.shape[0]):
        rows = slots == s
        out[rows] = x[rows] @ a[s].T @ b[s].T
    return out


def check_batched_lora_delta(student):
    def test(fn):
        gen = torch.Generator().manual_seed(0)
        # (tokens, adapters, rank, in, out): a decode batch, one token, one adapter, a wide output
        for tokens, adapters, rank, fan_in, fan_out in [
            (8, 3, 4, 16, 12),
            (1, 2, 2, 8, 8),
            (5, 1, 8, 16, 4),
            (6, 4, 2, 8, 24),
        ]:
            x = torch.randn(tokens, fan_in, generator=gen)
            a = torch.randn(adapters, rank, fan_in, generator=gen)
            b = torch.randn(adapters, fan_out, rank, generator=gen)
            slots = torch.randint(0, adapters, (tokens,), generator=gen)
            slots[0] = adapters - 1  # the last adapter is used at least once
            want = per_adapter_loop(x, a, b, slots)
            got = fn(x, a, b, slots)
            shape = f"x {list(x.shape)}, a {list(a.shape)}, b {list(b.shape)}"
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                found = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ExerciseFailure(
                    f"batched_lora_delta({shape}): expected a tensor of shape {list(want.shape)}, "
                    f"got {found}"
                )
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise ExerciseFailure(
                    f"batched_lora_delta({shape}) differs from the per-adapter loop (largest "
                    f"difference {(got - want).abs().max():.3g}). Hint: token t uses a[slots[t]] and "
                    f"b[slots[t]] only: gather both by slots, shrink to the rank, then expand"
                )

    return run_check("batched_lora_delta", student, reference_batched_lora_delta, test)
