"""Exercise checks for notebooks 01-03: each returns the student's function if it is right, else labkit's."""

from collections.abc import Callable

import torch

from ..checks import ExerciseFailure, run_check
from . import primitives as P


def _expect_tensor(got, want, what: str, atol: float = 1e-5):
    if got is None:
        raise ExerciseFailure(f"{what}: your function returned None (did you forget `return`?)")
    got = torch.as_tensor(got)
    want = torch.as_tensor(want)
    if got.shape != want.shape:
        raise ExerciseFailure(f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    if not torch.allclose(got.float(), want.float(), atol=atol, rtol=1e-4):
        worst = (got.float() - want.float()).abs().max().item()
        raise ExerciseFailure(
            f"{what}: values differ from the expected ones (largest difference {worst:.3g})"
        )


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, generator=g),
        torch.randn(8, 32, generator=g) * 3 + 1,
        torch.rand(100, generator=g) * 5,
        torch.tensor([-1.0, 0.0, 0.5, 2.0]),
    ]


# ---- notebook 01 -----------------------------------------------------------------------------------


def check_quantize_symmetric(student: Callable) -> Callable:
    def test(fn):
        for x in _inputs():
            for bits in (8, 4, 3):
                got = fn(x, bits)
                if not isinstance(got, tuple) or len(got) != 2:
                    raise ExerciseFailure("return a tuple (q, scale)")
                q, scale = P.quantize_symmetric(x, bits)
                _expect_tensor(got[1], scale, f"scale for {bits} bits")
                _expect_tensor(got[0], q, f"q for {bits} bits", atol=0)

    return run_check("quantize_symmetric", student, P.quantize_symmetric, test)


def check_quantize_asymmetric(student: Callable) -> Callable:
    def test(fn):
        for x in _inputs():
            for bits in (8, 4, 2):
                got = fn(x, bits)
                if not isinstance(got, tuple) or len(got) != 3:
                    raise ExerciseFailure("return a tuple (q, scale, zero)")
                q, scale, zero = P.quantize_asymmetric(x, bits)
                _expect_tensor(got[1], scale, f"scale for {bits} bits")
                _expect_tensor(got[2], zero, f"zero point for {bits} bits", atol=0)
                _expect_tensor(got[0], q, f"q for {bits} bits", atol=0)

    return run_check("quantize_asymmetric", student, P.quantize_asymmetric, test)


def reference_fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return P.fake_quantize(w, bits, symmetric=False, granularity="group", group_size=group_size)


def check_fake_quantize_groups(student: Callable) -> Callable:
    def test(fn):
        g = torch.Generator().manual_seed(1)
        w = torch.randn(16, 64, generator=g)
        for bits, gs in ((4, 16), (3, 32), (8, 64)):
            _expect_tensor(
                fn(w, bits, gs),
                reference_fake_quantize_groups(w, bits, gs),
                f"{bits}-bit, group_size {gs}",
                atol=1e-4,
            )

    return run_check("fake_quantize_groups", student, reference_fake_quantize_groups, test)


# ---- notebook 02 -----------------------------------------------------------------------------------


def reference_int8_linear_dynamic(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """x float [tokens, in]; w_q int8 [out, in]; w_scale [out]. Per-token symmetric int8 activations."""
    x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    x_q = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int32)
    acc = x_q @ w_q.to(torch.int32).t()  # exact integer accumulation, as int8 hardware does
    return acc.float() * x_scale * w_scale[None, :]


def check_int8_linear_dynamic(student: Callable) -> Callable:
    def test(fn):
        g = torch.Generator().manual_seed(2)
        x, w = torch.randn(5, 32, generator=g), torch.randn(12, 32, generator=g)
        w_scale = w.abs().amax(1) / 127
        w_q = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127).to(torch.int8)
        _expect_tensor(
            fn(x, w_q, w_scale), reference_int8_linear_dynamic(x, w_q, w_scale), "output", atol=1e-4
        )

    return run_check("int8_linear_dynamic", student, reference_int8_linear_dynamic, test)


# ---- notebook 03 -----------------------------------------------------------------------------------


def reference_hessian(x: torch.Tensor) -> torch.Tensor:
    """GPTQ's H = 2/n X^T X for inputs x [n_tokens, in_features]."""
    x = x.float()
    return 2 * x.t() @ x / x.shape[0]


def check_hessian(student: Callable) -> Callable:
    def test(fn):
        x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
        _expect_tensor(fn(x), reference_hessian(x), "H", atol=1e-4)

    return run_check("hessian", student, reference_hessian, test)


def reference_awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scales s = mean|x|^alpha, normalised so sqrt(max(s) * min(s)) = 1."""
    s = x_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def check_awq_scales(student: Callable) -> Callable:
    def test(fn):
        x_mean = torch.rand(16, generator=torch.Generator().manual_seed(4)) * 3 + 0.01
        for alpha in (0.0, 0.5, 0.9):
            _expect_tensor(
                fn(x_mean, alpha), reference_awq_scales(x_mean, alpha), f"scales for alpha={alpha}"
            )

    return run_check("awq_scales", student, reference_awq_scales, test)
