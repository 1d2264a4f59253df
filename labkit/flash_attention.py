"""FlashAttention and Flash-Decoding in plain PyTorch: the algorithms, readable, and their memory traffic.

**Naive attention** computes S = Q K^T / sqrt(d) [N, N], P = softmax(S), O = P V, and on a GPU writes S and P
to HBM (the GPU's main memory) between kernels: O(N^2) bytes moved, far more than the O(N d) inputs.

**FlashAttention** (Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
NeurIPS 2022) never materialises S: for each tile of queries it walks the keys and values tile by tile,
keeping per query row a running max m, the softmax's running denominator denom (the sum of exp(s - m)) and
an unnormalised output acc (the paper's m, l and O). When a new tile raises the max from m to m', everything accumulated so far was measured against the old max, so it
is rescaled by the correction factor exp(m - m') before the tile's own terms are added (the "online
softmax", Milakov & Gimelshein 2018):
    m'    = max(m, rowmax(S_tile))
    P     = exp(S_tile - m')
    denom = exp(m - m') * denom + rowsum(P)
    acc   = exp(m - m') * acc   + P V_tile
and at the end O = acc / denom. The result is exact (not an approximation); only the order of the sums
changes.
The tiles live in on-chip SRAM, so HBM sees Q, K, V read and O written, K and V once per query tile:
Theorem 2 of the paper, Theta(N^2 d^2 / M) HBM accesses for SRAM of M elements, against Theta(N d + N^2).

**Flash-Decoding** (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for long-context inference"): at decode
there is one query per sequence, so FlashAttention's parallelism over query tiles is gone, and at batch 1 a
GPU would run a handful of thread blocks (one per head) down a long KV sequence. Flash-Decoding splits the
keys into chunks processed in parallel, each returning its partial (o, m, denom), and merges them with the
same rescaling: m = max m_s, w_s = denom_s exp(m_s - m), o = sum w_s o_s / sum w_s (`combine_splits`).
"""

import math

import torch

# ---- attention, three ways ------------------------------------------------------------------------------


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False):
    """q [Nq, d], k and v [Nk, d] -> [Nq, d], materialising the [Nq, Nk] scores (causal: key j <= query i)."""
    scores = q @ k.T / math.sqrt(q.shape[-1])  # [Nq, Nk]
    if causal:
        scores = scores.masked_fill(causal_mask(q.shape[0], k.shape[0], 0, 0), float("-inf"))
    return scores.softmax(dim=-1) @ v


def causal_mask(rows: int, cols: int, row0: int, col0: int) -> torch.Tensor:
    """[rows, cols] True where key col0 + c comes after query row0 + r (masked out)."""
    return torch.arange(col0, col0 + cols)[None, :] > torch.arange(row0, row0 + rows)[:, None]


def reference_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_q: int = 16,
    block_k: int = 16,
) -> torch.Tensor:
    """Tiled attention with the online softmax: q [Nq, d], k and v [Nk, d] -> [Nq, d]. Any lengths (the last
    tiles are short); causal assumes Nq == Nk, as F.scaled_dot_product_attention's is_causal aligns them."""
    n_q, n_k, scale = q.shape[0], k.shape[0], 1 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for i in range(0, n_q, block_q):
        q_tile = q[i : i + block_q]  # [Bq, d]: stays "in SRAM" for the whole inner loop
        rows = q_tile.shape[0]
        m = torch.full((rows,), float("-inf"))  # running max of each row's scores
        denom = torch.zeros(rows)  # running sum of exp(score - m)
        acc = torch.zeros(rows, v.shape[-1])  # running sum of exp(score - m) * v, unnormalised
        last_key = i + rows if causal else n_k  # causal: tiles right of the diagonal are skipped
        for j in range(0, last_key, block_k):
            s = q_tile @ k[j : j + block_k].T * scale  # [Bq, Bk]
            if causal:
                s = s.masked_fill(causal_mask(rows, s.shape[1], i, j), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = torch.exp(s - m_new[:, None])
            correction = torch.exp(m - m_new)  # 0 at the first tile (m = -inf), <= 1 after
            denom = correction * denom + p.sum(dim=-1)
            acc = correction[:, None] * acc + p @ v[j : j + block_k]
            m = m_new
        out[i : i + block_q] = acc / denom[:, None]
    return out


# ---- the usual mistakes, for the check to recognise -----------------------------------------------------

MISTAKES = {
    "sum_not_output": "you rescale the running sum denom but not the partial output: multiply acc by "
    "exp(m_old - m_new) too, before adding the new tile's P @ V",
    "stale_max": "your running max is never updated (a stale max): every tile is rescaled against a max "
    "of -inf, so only the last tile survives; store m = m_new at the end of each tile",
    "wrong_correction": "your correction factor uses the new tile's own max: it must be exp(m_old - m_new) "
    "with m_new = max(m_old, rowmax(S_tile)), the max over everything seen so far",
}


def mistaken_flash_attention(q, k, v, causal: bool, block_q: int, block_k: int, mistake: str):
    """reference_flash_attention with one of MISTAKES made, written as a student would make it."""
    n_q, n_k, scale = q.shape[0], k.shape[0], 1 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for i in range(0, n_q, block_q):
        q_tile = q[i : i + block_q]
        rows = q_tile.shape[0]
        m = torch.full((rows,), float("-inf"))
        denom, acc = torch.zeros(rows), torch.zeros(rows, v.shape[-1])
        for j in range(0, i + rows if causal else n_k, block_k):
            s = q_tile @ k[j : j + block_k].T * scale
            if causal:
                s = s.masked_fill(causal_mask(rows, s.shape[1], i, j), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = torch.exp(s - m_new[:, None])
            tile_max = s.amax(dim=-1)
            correction = torch.exp(m - (tile_max if mistake == "wrong_correction" else m_new))
            denom = correction * denom + p.sum(dim=-1)
            acc = (acc if mistake == "sum_not_output" else correction[:, None] * acc) + p @ v[
                j : j + block_k
            ]
            if mistake != "stale_max":
                m = m_new
        out[i : i + block_q] = acc / denom[:, None]
    return out


# ---- Flash-Decoding: one query, the keys split into chunks ----------------------------------------------


def split_kv_partials(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode query q [heads, d] against k, v [heads, N, d], the keys cut into `num_splits` chunks that
    are attended independently (on a GPU: in parallel, one thread block each). Returns each chunk's
    normalised output o [splits, heads, d], its max m and its sum denom [splits, heads]."""
    heads, n, d = k.shape
    chunk = -(-n // num_splits)
    pad = chunk * num_splits - n  # the last chunk is padded with keys whose score is -inf
    if pad:
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (k, v))
    k_split = k.view(heads, num_splits, chunk, d)
    v_split = v.view(heads, num_splits, chunk, d)
    s = (k_split @ q[:, None, :, None]).squeeze(-1) / math.sqrt(d)  # [heads, splits, chunk]
    if pad:
        s[:, -1, chunk - pad :] = float("-inf")
    m = s.amax(dim=-1)  # [heads, splits]
    p = torch.exp(s - m[..., None])
    denom = p.sum(dim=-1)
    o = (p[..., None, :] @ v_split).squeeze(-2) / denom[..., None]  # [heads, splits, d]
    return o.transpose(0, 1), m.T, denom.T


def combine_splits(o: torch.Tensor, m: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Merge chunk results o [splits, heads, d], m and denom [splits, heads] into [heads, d]: the online
    softmax's rescaling, once, across chunks (Flash-Decoding's reduction kernel)."""
    m_all = m.amax(dim=0)  # [heads]
    weight = denom * torch.exp(m - m_all)  # [splits, heads]: each chunk's share of the softmax mass
    return (weight[..., None] * o).sum(dim=0) / weight.sum(dim=0)[..., None]


def split_kv_decode(q, k, v, num_splits: int) -> torch.Tensor:
    """Flash-Decoding for one query per head: q [heads, d], k and v [heads, N, d] -> [heads, d]."""
    return combine_splits(*split_kv_partials(q, k, v, num_splits))


# ---- memory traffic -------------------------------------------------------------------------------------


def naive_attention_hbm_elements(n: int, d: int) -> int:
    """Elements standard attention moves to and from HBM for one head (the paper's Algorithm 0): read Q, K;
    write S; read S, write P; read P, V; write O: 4Nd + 4N^2."""
    return 4 * n * d + 4 * n * n


def flash_attention_hbm_elements(n: int, d: int, block_q: int, causal: bool = False) -> int:
    """Elements FlashAttention moves for one head, queries outer (FlashAttention-2's loop order): Q read and
    O written once (2Nd), K and V read once per query tile (2Nd per tile; causal: only the tiles left of
    the diagonal, about half)."""
    tiles = -(-n // block_q)
    kv_reads = sum(min(n, (t + 1) * block_q) if causal else n for t in range(tiles)) * 2 * d
    return 2 * n * d + kv_reads


def sram_block_rows(sram_bytes: int, d: int, element_bytes: int) -> int:
    """The paper's tile size, B = ceil(M / 4d) rows for SRAM of M elements (room for Q, K, V and O tiles)."""
    return -(-(sram_bytes // element_bytes) // (4 * d))
