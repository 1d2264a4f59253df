"""The linear layers' oneDNN op (labkit/engine/onednn_linear.py) against F.linear, eager and compiled."""

import pytest
import torch
import torch.nn.functional as F

from labkit.engine import onednn_linear
from labkit.engine.fast_layers import prepacked_linear

pytestmark = pytest.mark.skipif(
    not onednn_linear.available(),
    reason="needs the oneDNN wheels (x86-64 Linux), a C++ compiler and ninja",
)

# SmolLM2's fused projections (q+k+v, o, gate+up, down) and a narrow one
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (100, 64)]


@pytest.mark.parametrize("rows", [1, 2, 16, 33, 300])
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_float32_equals_f_linear(rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    x = torch.randn(rows, in_features, generator=g)
    got = onednn_linear.OneDNNLinear(w, None)(x)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_dtype(dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 instructions")
    w, b, x = (
        torch.randn(100, 64).to(dtype),
        torch.randn(100).to(dtype),
        torch.randn(7, 64).to(dtype),
    )
    got = onednn_linear.OneDNNLinear(w, b)(x)
    assert got.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        got.float(), F.linear(x, w, b).float(), rtol=tolerance, atol=tolerance * 10
    )


def test_every_thread_count_gives_the_same_rows():
    """A primitive's work split is fixed when it is made: one per thread count, each summing alike."""
    w, x = torch.randn(3072, 576) * 0.02, torch.randn(16, 576)
    linear = onednn_linear.OneDNNLinear(w, None)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(linear(x))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(outs[0], outs[2])


def test_inside_a_compiled_graph():
    w, b = torch.randn(96, 64), torch.randn(96)
    linear = onednn_linear.OneDNNLinear(w, b)

    def step(x):
        return torch.relu(linear(x)) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows in (2, 5, 9):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(compiled(x), step(x))


def test_prepacked_linear_takes_it():
    w = torch.randn(32, 64)
    assert isinstance(prepacked_linear(w), onednn_linear.OneDNNLinear)


def test_zero_rows_and_bad_shapes_say_what_is_wrong():
    linear = onednn_linear.OneDNNLinear(torch.randn(32, 64), None)
    assert linear(torch.empty(0, 64)).shape == (0, 32)
    with pytest.raises(RuntimeError, match="does not match in_features=48"):
        linear(torch.randn(3, 48))
    with pytest.raises(RuntimeError, match=r"\[rows, in_features\]"):
        linear(torch.randn(2, 3, 64))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        linear(torch.randn(3, 64).double())


def test_without_the_op_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setattr(onednn_linear, "available", lambda: False)
    with pytest.raises(RuntimeError, match="check onednn_linear.available"):
        onednn_linear.OneDNNLinear(torch.randn(4, 4), None)


def test_many_row_counts_stay_correct_past_the_primitive_cache():
    """Every row count gets its own primitive; past 1,024 of them the cache starts over (a server meets
    every prompt length), and the rows are still right."""
    w = torch.randn(24, 16)
    linear = onednn_linear.OneDNNLinear(w, None)
    for rows in range(1, 1100):
        x = torch.randn(rows, 16)
        out = linear(x)
        if rows % 97 == 0 or rows > 1090:
            torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
