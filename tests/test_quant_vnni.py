"""The integer-dot-product int4 kernel (labkit/quant/vnni.py) against the arithmetic it claims to do."""

import pytest
import torch

from labkit.quant import kernels, vnni

pytestmark = pytest.mark.skipif(
    not vnni.available(), reason="needs a CPU with AVX512-VNNI, a C++ compiler and ninja"
)


def random_codes(out_features: int, in_features: int, group_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=g)
    zero = torch.randint(0, 16, (out_features, groups), generator=g)
    scale = torch.rand(out_features, groups, generator=g) * 0.02 + 0.001
    return q, zero, scale


def dequantized(q, zero, scale, group_size: int) -> torch.Tensor:
    return (q - zero.repeat_interleave(group_size, 1)).float() * scale.repeat_interleave(
        group_size, 1
    )


@pytest.mark.parametrize("group_size", vnni.GROUP_SIZES)
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_kernel_computes_the_quantized_activation_times_the_4_bit_weight(group_size, rows):
    """The kernel's result is exactly (s * a) @ W.T up to float32 summation order: a the 8-bit rows that
    quantize_rows makes, W the weight the GPTQ codes describe."""
    q, zero, scale = random_codes(96, 256, group_size)
    x = torch.randn(rows, 256)
    got = vnni.matmul(x, vnni.pack(q, zero, scale))
    a, s = vnni.quantize_rows(x)
    want = (a.float() * s[:, None]) @ dequantized(q, zero, scale, group_size).T
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_packed_copy_holds_nothing_a_symmetric_row_does_not_read():
    """Codes (0.5 bytes a weight), then a float32 scale and an int8 zero point per group of 64: 0.578 bytes
    a weight. The prepack's per-block sums of (q - zero) serve only asymmetric activations: not kept."""
    q, zero, scale = random_codes(96, 256, 64)
    packed = vnni.pack(q, zero, scale)
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    assert packed[-1].numel() == 0
    assert nbytes / q.numel() == pytest.approx(0.5 + 4 / 64 + 1 / 64)


def test_quantize_rows_rounds_each_element_to_its_nearest_code():
    x = torch.randn(3, 200) * torch.tensor([[0.01], [1.0], [100.0]])
    a, s = vnni.quantize_rows(x)
    assert (
        a.dtype == torch.int8 and a.abs().max() == 127
    )  # the largest element of each row maps to 127
    assert ((a.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all()


def test_more_rows_than_the_build_takes_fail_with_a_message():
    if torch.cpu._is_amx_tile_supported():
        pytest.skip("with AMX the kernel takes any number of rows")
    q, zero, scale = random_codes(32, 64, 32)
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        vnni.matmul(torch.randn(5, 64), vnni.pack(q, zero, scale))


def test_the_int4_kernel_takes_it_for_one_compiled_row_only():
    """build_int4's one row inside a compiled graph runs the VNNI kernel (8-bit activations); eagerly, and
    for more rows, PyTorch's int4 kernel (bfloat16 activations). Both are close to the float weight."""
    q, zero, scale = random_codes(64, 128, 64, seed=1)
    run = kernels.build_int4(q, zero, scale, 64, bias=None)
    x = torch.randn(1, 128)
    want = x @ dequantized(q, zero, scale, 64).T
    eager = run(x)
    compiled = torch.compile(run, fullgraph=True, dynamic=False)(x)
    assert not torch.equal(eager, compiled)  # two kernels, two roundings
    torch.testing.assert_close(compiled, vnni.matmul(x, vnni.pack(q, zero, scale)))
    for y in (eager, compiled):
        assert (y - want).norm() / want.norm() < 0.02
