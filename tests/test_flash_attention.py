"""labkit.flash_attention: the tiled loop and Flash-Decoding's split-KV merge equal scaled_dot_product_attention;
the IO counts follow the paper's formulas; and notebook 04c's check names each usual mistake when fed it."""

import pytest
import torch
import torch.nn.functional as F

from labkit.flash_attention import (
    MISTAKES,
    flash_attention_hbm_elements,
    mistaken_flash_attention,
    naive_attention,
    naive_attention_hbm_elements,
    reference_flash_attention,
    split_kv_decode,
    sram_block_rows,
)
from labkit.flash_attention_checks import check_flash_attention


@pytest.mark.parametrize("n_q, n_k, causal", [(1, 1, False), (33, 70, False), (45, 45, True)])
@pytest.mark.parametrize("block", [1, 7, 16, 64])
def test_tiled_attention_equals_sdpa(n_q, n_k, causal, block):
    gen = torch.Generator().manual_seed(n_q + block)
    q, k, v = (torch.randn(n, 16, generator=gen) for n in (n_q, n_k, n_k))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = reference_flash_attention(q, k, v, causal, block_q=block, block_k=block + 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, causal), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3, 8, 100])
def test_split_kv_decode_equals_attention_over_all_keys(splits):
    gen = torch.Generator().manual_seed(splits)
    q, k, v = (
        torch.randn(3, 16, generator=gen),
        *(torch.randn(3, 100, 16, generator=gen) for _ in "kv"),
    )
    want = F.scaled_dot_product_attention(q[:, None], k, v)[:, 0]
    torch.testing.assert_close(split_kv_decode(q, k, v, splits), want, rtol=1e-5, atol=1e-5)


def test_io_counts():
    n, d = 1024, 64
    assert naive_attention_hbm_elements(n, d) == 4 * n * d + 4 * n * n
    # one query tile: Q, K, V read once, O written once
    assert flash_attention_hbm_elements(n, d, block_q=n) == 4 * n * d
    assert flash_attention_hbm_elements(n, d, block_q=256) == 2 * n * d + 4 * 2 * n * d
    causal = flash_attention_hbm_elements(n, d, 256, causal=True)
    assert causal == 2 * n * d + (256 + 512 + 768 + 1024) * 2 * d
    assert sram_block_rows(192 * 1024, 64, 2) == 384  # the paper's B = ceil(M / 4d)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_check_names_each_usual_mistake(mistake, capsys):
    def student(q, k, v, causal=False, block_q=16, block_k=16):
        return mistaken_flash_attention(q, k, v, causal, block_q, block_k, mistake)

    assert check_flash_attention(student) is reference_flash_attention
    assert MISTAKES[mistake] in capsys.readouterr().out


def test_the_check_explains_nan_and_single_tile_errors(capsys):
    def nan_student(q, k, v, causal=False, block_q=16, block_k=16):
        return reference_flash_attention(q, k, v, causal, block_q, block_k) * float("nan")

    def unscaled(q, k, v, causal=False, block_q=16, block_k=16):  # forgot 1/sqrt(d)
        return reference_flash_attention(q * q.shape[-1] ** 0.5, k, v, causal, block_q, block_k)

    check_flash_attention(nan_student)
    assert "exp(m_old - m_new) is 0 there" in capsys.readouterr().out
    check_flash_attention(unscaled)
    assert "single key tile" in capsys.readouterr().out
