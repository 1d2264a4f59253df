"""Paged attention the plain way, one sequence at a time: the readable reference the fast paths match.

attention.py computes the same thing for a whole batch at once, with index tensors built once per step and
`embedding_bag` reading the cache in place. This file keeps only the idea: look up where each of the
sequence's tokens sits in the paged cache (its block table), gather those keys and values into ordinary
dense [tokens, head_dim] tensors, and run textbook causal attention. tests/test_engine_attention.py checks
the fast decode and prefill paths against it.
"""

import torch


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[int], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, num_tokens, head_dim] of a sequence's first num_tokens tokens.

    k_cache [kv_heads, num_blocks, head_dim, block_size] (transposed within each block),
    v_cache [kv_heads, num_blocks * block_size, head_dim] (see kv_cache.PagedKVCache)."""
    kv_heads, num_blocks, head_dim, block_size = k_cache.shape
    position = torch.arange(num_tokens)
    table = torch.tensor(block_table, dtype=torch.long)
    slot = table[position // block_size] * block_size + position % block_size  # [num_tokens]
    keys = k_cache.transpose(2, 3).reshape(kv_heads, num_blocks * block_size, head_dim)
    return keys[:, slot], v_cache[:, slot]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: list[int],
    start: int,
    scale: float,
) -> torch.Tensor:
    """q [n, heads, head_dim]: one sequence's queries at positions start .. start + n - 1, whose keys and
    values are already in the cache. Returns [n, heads, head_dim]. Decode is the case n = 1."""
    n, heads, _ = q.shape
    k, v = gather_kv(k_cache, v_cache, block_table, start + n)  # [kv_heads, start + n, head_dim]
    group = heads // k.shape[0]  # grouped-query attention: each KV head serves `group` query heads
    k, v = k.repeat_interleave(group, dim=0).float(), v.repeat_interleave(group, dim=0).float()
    scores = torch.einsum("qhd,hkd->hqk", q.float() * scale, k)  # [heads, n, start + n]
    query_pos = torch.arange(start, start + n)[:, None]
    key_pos = torch.arange(start + n)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))  # causal: no looking ahead
    return torch.einsum("hqk,hkd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
