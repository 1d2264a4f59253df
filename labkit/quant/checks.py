"""Exercise checks for notebooks 01-03: each returns the student's function if it is right, else labkit's."""

from collections.abc import Callable

import torch

from ..checks import ExerciseFailure, run_check
from . import primitives as P
from .qat import ste_fake_quantize


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


def reference_gptq_columns(W: torch.Tensor, U: torch.Tensor, quantize: Callable) -> torch.Tensor:
    """GPTQ's column loop, one column at a time (labkit.quant.gptq does the same in lazy blocks).

    W [out, in]: the weight; U [in, in]: the upper Cholesky factor of the damped H^-1 (H^-1 = U^T U);
    quantize: a column [out] -> its dequantized value on the row's grid [out].
    Returns the quantized weight [out, in] (dequantized floats)."""
    W = W.detach().float().clone()  # the columns not yet quantized get updated: work on a copy
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = quantize(W[:, j])
        err = (W[:, j] - Q[:, j]) / U[j, j]  # [out]
        # every later column, all rows at once
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return Q


def _gptq_problem():
    """A small layer with correlated inputs: W [8, 32], U from H = 2/n X^T X (damped), a 3-bit grid."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(32, 32, generator=g) / 4 + torch.eye(32)
    X = torch.randn(96, 32, generator=g) @ mix  # [tokens, in]: correlated channels
    X[:, 3] *= 8  # and one loud channel
    W = torch.randn(8, 32, generator=g)
    H = 2 * X.t() @ X / len(X)
    H += 0.01 * torch.diag(H).mean() * torch.eye(32)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    # one asymmetric 3-bit grid per row, fitted to the original weights
    lo, hi = W.amin(1), W.amax(1)
    scale = (hi - lo).clamp(min=1e-8) / 7
    zero = torch.round(-lo / scale)

    def quantize(col):
        return (torch.clamp(torch.round(col / scale) + zero, 0, 7) - zero) * scale

    return W, U, Hinv, quantize


def _gptq_mistakes(W, U, Hinv, quantize) -> list[tuple[str, torch.Tensor]]:
    """What common slips of the column loop compute, each with what to tell the student."""

    def loop(divisor, row, sign=1.0):
        W = W_.clone()
        Q = torch.zeros_like(W)
        for j in range(W.shape[1]):
            Q[:, j] = quantize(W[:, j])
            err = (W[:, j] - Q[:, j]) / divisor(j)
            W[:, j + 1 :] -= sign * err[:, None] * row(j)[None, :]
        return Q

    W_ = W.float()
    rtn = torch.stack([quantize(W_[:, j]) for j in range(W_.shape[1])], 1)
    return [
        (
            "your result is plain round-to-nearest: each column's error must be pushed onto the "
            "columns not yet quantized (W[:, j+1:] -= err * U[j, j+1:]), and each column quantized "
            "*after* the updates it received",
            rtn,
        ),
        (
            "the update has the wrong sign: the remaining columns move *against* the error, "
            "W[:, j+1:] -= err * U[j, j+1:]",
            loop(lambda j: U[j, j], lambda j: U[j, j + 1 :], sign=-1.0),
        ),
        (
            "divide the column's error by U[j, j], the diagonal of the Cholesky factor of H^-1 "
            "(you did not divide)",
            loop(lambda j: 1.0, lambda j: U[j, j + 1 :]),
        ),
        (
            "you divided by U[j, j]^2: with U's row, the divisor is U[j, j] "
            "(U[j, j]^2 goes with the row of the shrinking inverse, not with U's row)",
            loop(lambda j: U[j, j] ** 2, lambda j: U[j, j + 1 :]),
        ),
        (
            "you used row j of H^-1 itself: it is right only for the first column; after that the "
            "inverse must shrink to the columns left, which is what the Cholesky factor U holds",
            loop(lambda j: Hinv[j, j], lambda j: Hinv[j, j + 1 :]),
        ),
    ]


def check_gptq_columns(student: Callable) -> Callable:
    def test(fn):
        W, U, Hinv, quantize = _gptq_problem()
        got = fn(W.clone(), U, quantize)
        want = reference_gptq_columns(W, U, quantize)
        if got is not None and torch.as_tensor(got).shape == want.shape:
            got = torch.as_tensor(got).float()
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                for message, wrong in _gptq_mistakes(W, U, Hinv, quantize):
                    if torch.allclose(got, wrong, atol=1e-4, rtol=1e-4):
                        raise ExerciseFailure(message)
        _expect_tensor(got, want, "quantized weight", atol=1e-4)

    return run_check("gptq_columns", student, reference_gptq_columns, test)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||(W_hat - W) x||^2, averaged over output rows, from G = X^T X / n [in, in]:
    sum_k d_k G d_k^T for each row d_k of W_hat - W, with no pass over the tokens."""
    D = W_hat.float() - W.float()
    return ((D @ G) * D).sum(1).mean()


def reference_awq_search(
    x_mean: torch.Tensor, G: torch.Tensor, W: torch.Tensor, quantize: Callable, n_grid: int = 20
) -> tuple[float, torch.Tensor]:
    """AWQ's scale search for one linear (labkit.quant.awq.search_scale does it for several at once).

    x_mean [in]: mean |x| per input channel; G [in, in]: X^T X / n; W [out, in];
    quantize: a weight [out, in] -> its dequantized round-to-nearest copy.
    Tries alpha = 0, 1/n_grid, ..., (n_grid-1)/n_grid; returns (best alpha, its scales s [in])."""
    best = (float("inf"), 0.0, torch.ones_like(x_mean))
    for alpha in [i / n_grid for i in range(n_grid)]:
        s = reference_awq_scales(x_mean, alpha)
        W_hat = quantize(W * s) / s  # the layer computes with Q(W s) and the input divided by s
        err = output_error(W, W_hat, G).item()
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def _awq_problem():
    """A small layer whose inputs have a few loud channels: x_mean, G, W [16, 64], 3-bit groups of 16."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(256, 64, generator=g)
    X[:, [5, 40]] *= 20  # salient channels
    W = torch.randn(16, 64, generator=g)
    x_mean, G = X.abs().mean(0), X.t() @ X / len(X)

    def quantize(w):
        return P.quantize_weight(w, 3, False, "group", 16).dequantize()

    return x_mean, G, W, quantize


def check_awq_search(student: Callable) -> Callable:
    def test(fn):
        x_mean, G, W, quantize = _awq_problem()
        got = fn(x_mean, G, W.clone(), quantize, 20)
        if not isinstance(got, tuple) or len(got) != 2:
            raise ExerciseFailure("return a tuple (best alpha, scales s)")
        alpha, s = got
        want_alpha, want_s = reference_awq_search(x_mean, G, W, quantize, 20)
        if float(alpha) != want_alpha:
            forgot_unscale = _awq_variant(x_mean, G, W, quantize, unscale=False)
            weight_only = _awq_variant(x_mean, G, W, quantize, use_G=False)
            if float(alpha) == forgot_unscale != want_alpha:
                hint = "divide the quantized weight by s again: the layer computes with Q(W s) / s"
            elif float(alpha) == weight_only != want_alpha:
                hint = (
                    "you compared weight errors; AWQ compares *output* errors, sum(D G * D) with "
                    "D = W_hat - W and G = X^T X / n, so channels with large inputs count more"
                )
            elif float(alpha) == (20 - 1) / 20:
                hint = "keep the alpha with the *smallest* error, not the last one tried"
            else:
                hint = "for each alpha: s = awq_scales(x_mean, alpha), W_hat = Q(W s) / s, error through G"
            raise ExerciseFailure(f"best alpha: expected {want_alpha}, got {alpha}; {hint}")
        _expect_tensor(s, want_s, "scales of the best alpha")

    return run_check("awq_search", student, reference_awq_search, test)


def _awq_variant(x_mean, G, W, quantize, unscale=True, use_G=True) -> float:
    """The alpha a slip picks: scales never undone, or errors measured on the weights (G = I)."""
    G = G if use_G else torch.eye(len(G))
    errs = {}
    for alpha in [i / 20 for i in range(20)]:
        s = reference_awq_scales(x_mean, alpha)
        W_hat = quantize(W * s) / s if unscale else quantize(W * s)
        errs[alpha] = output_error(W, W_hat, G).item()
    return min(errs, key=errs.__getitem__)


# ---- notebook 02b ----------------------------------------------------------------------------------


def check_smoothing_scales(student: Callable) -> Callable:
    from .smoothquant import smoothing_scales

    def test(fn):
        g = torch.Generator().manual_seed(5)
        x_absmax = torch.rand(16, generator=g) * 50 + 0.1
        w_absmax = torch.rand(16, generator=g) * 0.5 + 0.01
        for alpha in (0.0, 0.5, 0.8, 1.0):
            _expect_tensor(
                fn(x_absmax, w_absmax, alpha),
                smoothing_scales(x_absmax, w_absmax, alpha),
                f"scales for alpha={alpha}",
                atol=1e-4,
            )

    return run_check("smoothing_scales", student, smoothing_scales, test)


# ---- notebook 03c ----------------------------------------------------------------------------------


def reference_ste_fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return ste_fake_quantize(w, bits, group_size, symmetric=False)


def check_ste_fake_quantize(student: Callable) -> Callable:
    """fn(w, bits, group_size) -> w_hat: RTN's fake-quantized w (asymmetric groups) in the forward pass,
    the upstream gradient passed straight through to w (zero where the quantizer clamps, if you mask)."""
    reference = reference_ste_fake_quantize

    def test(fn):
        g = torch.Generator().manual_seed(0)
        for bits, group_size in ((2, 32), (3, 64), (4, 16)):
            w = torch.randn(8, 64, generator=g)
            upstream = torch.randn(8, 64, generator=g)
            w_s, w_r = w.clone().requires_grad_(), w.clone().requires_grad_()
            got, want = fn(w_s, bits, group_size), reference(w_r, bits, group_size)
            _expect_tensor(got, want.detach(), f"forward value at {bits} bits", atol=1e-6)
            if not isinstance(got, torch.Tensor) or got.grad_fn is None:
                raise ExerciseFailure(
                    "no gradient reaches w: the output must be built from w itself, e.g. "
                    "w + (w_hat - w).detach()"
                )
            got.backward(upstream)
            want.backward(upstream)
            inside = w_r.grad != 0  # where the reference passes the gradient through
            if w_s.grad is None or not torch.allclose(w_s.grad[inside], upstream[inside]):
                raise ExerciseFailure(
                    f"at {bits} bits the gradient wrt w is not the upstream gradient: the STE treats "
                    "round() as the identity in the backward pass (did you detach w itself?)"
                )

    return run_check("ste_fake_quantize", student, reference, test)
