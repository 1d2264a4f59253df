"""The C++ paged decode attention (labkit/engine/paged_kernel.py) against the eager path's ragged kernel."""

import pytest
import torch

from labkit.engine import paged_kernel
from labkit.engine.attention import build_decode_batch, decode_attention, padded_tables

pytestmark = pytest.mark.skipif(
    not paged_kernel.available(), reason="needs a C++ compiler and ninja to build the kernel"
)

HEADS, KV_HEADS, DIM, BLOCK, BLOCKS = 9, 3, 64, 16, 64  # SmolLM2's attention shape


def scattered_cache(lengths: list[int], dtype, seed: int = 0):
    """A cache of random K/V and a query per row; each row's blocks scattered over the cache."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(KV_HEADS, BLOCKS, DIM, BLOCK, generator=g).to(dtype)
    v = torch.randn(KV_HEADS, BLOCKS * BLOCK, DIM, generator=g).to(dtype)
    q = torch.randn(len(lengths), HEADS, DIM, generator=g).to(dtype)
    free = torch.randperm(BLOCKS, generator=g).tolist()
    tables = []
    for n in lengths:
        blocks = -(-n // BLOCK)
        tables.append(free[:blocks])
        free = free[blocks:]
    return q, k, v, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [5, 17, 33], [16, 32, 100, 7, 250, 64, 1, 130]])
def test_the_kernel_attends_as_the_ragged_kernel_does(dtype, lengths):
    q, k, v, tables = scattered_cache(lengths, dtype)
    batch = build_decode_batch(
        list(range(len(lengths))), lengths, tables, HEADS, KV_HEADS, BLOCKS, BLOCK, DIM, "cpu"
    )
    want = decode_attention(q, k, v, batch, DIM**-0.5)
    padded = torch.tensor(padded_tables(lengths, tables, BLOCK, min_blocks=2))
    got = paged_kernel.paged_decode_attention(q, k, v, padded, torch.tensor(lengths), DIM**-0.5)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_keys_past_a_rows_length_are_never_read():
    """Garbage (NaN) in the rest of the last block and in the table's padding does not leak in."""
    q, k, v, tables = scattered_cache([20], torch.float32)
    clean = paged_kernel.paged_decode_attention(
        q, k, v, torch.tensor([tables[0]]), torch.tensor([20]), 0.125
    )
    k[:, tables[0][1], :, 4:] = float("nan")  # keys 21-32 of the row's second block
    v.view(KV_HEADS, BLOCKS, BLOCK, DIM)[:, tables[0][1], 4:] = float("nan")
    padded = torch.tensor([tables[0] + [BLOCKS - 1]])  # one table entry more than it needs
    k[:, BLOCKS - 1] = float("nan")
    got = paged_kernel.paged_decode_attention(q, k, v, padded, torch.tensor([20]), 0.125)
    torch.testing.assert_close(got, clean)


def test_bad_tables_and_lengths_fail_with_a_message():
    q, k, v, tables = scattered_cache([20], torch.float32)
    with pytest.raises(RuntimeError, match="has 40 keys; its table holds 32"):
        paged_kernel.paged_decode_attention(
            q, k, v, torch.tensor([tables[0]]), torch.tensor([40]), 0.125
        )
    with pytest.raises(RuntimeError, match="names block 64 of 64"):
        paged_kernel.paged_decode_attention(
            q, k, v, torch.tensor([[tables[0][0], BLOCKS]]), torch.tensor([20]), 0.125
        )
