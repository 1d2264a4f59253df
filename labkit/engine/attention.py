"""Attention over the paged KV cache, in plain PyTorch: decode without copying the blocks out, prefill by gather.

The cache (kv_cache.py) stores, per layer and KV head:
    V as rows of slots:            v[h, block * block_size + offset, :]     one [head_dim] row per token
    K transposed within a block:   k[h, block, :, offset]                   one [block_size] row per dimension

**Decode** (one new query per sequence; most steps of a serving engine): `F.embedding_bag` is a fused
"gather rows by index, multiply each by a weight, sum them per bag" - it reads the rows straight from the
cache and never writes a gathered copy. Both halves of attention have exactly that shape:
    scores of one block = sum over d of  q[d] * k[h, block, d, :]     (bag = head_dim rows of K, weights q)
    output              = sum over s of  p[s] * v[h, slot_s, :]       (bag = the sequence's slots, weights p)
So every sequence reads only its own blocks, in place, with no padding - what vLLM's PagedAttention kernel
does in CUDA/C++ (its key cache is also laid out per block with the head dimension before the tokens).
Measured on one CPU core: 2x (K) and 3.5x (V) faster than gathering the blocks and running two `bmm`s.

**Prefill** (many queries per sequence, causal): gather each sequence's blocks into dense [keys, head_dim]
matrices and run causal attention on them, one sequence at a time (what a "varlen" attention kernel does on a
GPU). Here each gathered key serves many queries, so the copy is cheap; padding every prompt to the longest
one would not be (see `prefill_attention`).

**A quantized cache** (kv_quant.py: 8-bit codes with a scale per slot and head) passes its scales to
`prefill_attention` and `padded_decode_attention`, which dequantize the blocks right after gathering them;
`decode_attention`'s embedding_bag reads only float tables, so such a cache decodes with the padded kernel
(`PaddedDecodeBatch`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_quant import dequantize


@dataclass
class DecodeRows:
    """The step's decode tokens (one per sequence), as plain lists: the eager path builds its ragged
    DecodeBatch from them, the compiled path pads them to static shapes."""

    token_index: list[int]  # position of each decode token in the step's flat batch
    context_lens: list[int]  # keys each attends to, its own included
    tables: list[list[int]]  # each sequence's block table


@dataclass
class DecodeBatch:
    """Index tensors for one step's decode tokens; built once per step and shared by every layer
    (each layer's cache has the same layout, so the same indices address it). Everything is ordered
    (head, sequence, ...): a sequence's rows are the same for every head, only the head's offset differs."""

    token_index: torch.Tensor  # [B] positions of the decode tokens in the step's flat batch
    k_rows: torch.Tensor  # rows of k.view(-1, block_size): head_dim per (head, sequence, block) bag
    # [heads * B * max_blocks] start of each block's bag (past the end: empty bag)
    k_offsets: torch.Tensor
    k_owner: torch.Tensor  # [bags] the (head, sequence) whose query weights each non-empty bag
    mask: torch.Tensor  # [1, B, max_blocks * block_size] additive: -inf past a sequence's length
    keys: torch.Tensor  # flat index into the [heads, B, max_keys] scores of every real key
    v_rows: torch.Tensor  # rows of v.view(-1, head_dim): each real key of each (head, sequence)
    v_offsets: torch.Tensor  # [heads * B] start of each (head, sequence) bag

    def index_tensors(self) -> tuple[torch.Tensor, ...]:
        """What `decode_attention_op` (the custom op) takes, in its order: everything but token_index."""
        return (
            self.k_rows,
            self.k_offsets,
            self.k_owner,
            self.mask,
            self.keys,
            self.v_rows,
            self.v_offsets,
        )


def ragged(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For bags of the given lengths laid end to end: each element's bag, its index within the bag, and
    each bag's start. (Arithmetic instead of boolean masks: `x[mask]` is several times slower on a CPU.)"""
    starts = lengths.cumsum(0) - lengths
    owner = torch.repeat_interleave(lengths)
    return owner, torch.arange(owner.numel(), device=lengths.device) - starts[owner], starts


def build_decode_batch(
    token_index: list[int],
    context_lens: list[int],
    tables: list[list[int]],
    heads: int,
    kv_heads: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    device,
) -> DecodeBatch:
    """context_lens[b] = keys sequence b attends to (its new token included); tables[b] = its block table."""
    B, bs, arange = len(context_lens), block_size, lambda n: torch.arange(n, device=device)
    max_blocks = -(-max(context_lens) // bs)
    table = torch.tensor(
        [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables], device=device
    )
    ctx = torch.tensor(context_lens, device=device)
    n_blocks = (ctx + bs - 1) // bs
    kv_head = (arange(heads) // (heads // kv_heads))[
        :, None
    ]  # query head -> its KV head, [heads, 1]
    head = arange(heads)[:, None]
    # K: bag (head, sequence, block j) = the head_dim rows of that block; j past the sequence's end: empty bag
    seq, j, starts = ragged(n_blocks)  # every (sequence, block) pair
    first_row = (kv_head * num_blocks + table[seq, j]) * head_dim  # [heads, pairs]
    k_rows = (first_row[..., None] + arange(head_dim)).reshape(-1)
    k_offsets = head_dim * (
        head[..., None] * seq.numel()
        + starts[:, None]
        + torch.minimum(arange(max_blocks), n_blocks[:, None])
    )  # [heads, B, max_blocks]
    # V: bag (head, sequence) = the slots of its real keys
    seq_v, key, starts_v = ragged(ctx)  # every (sequence, key) pair
    slot = table[seq_v, key // bs] * bs + key % bs
    max_keys = max_blocks * bs
    mask = torch.zeros(1, B, max_keys, device=device).masked_fill(
        arange(max_keys) >= ctx[:, None], float("-inf")
    )
    return DecodeBatch(
        token_index=torch.tensor(token_index, device=device),
        k_rows=k_rows,
        k_offsets=k_offsets.reshape(-1),
        k_owner=(head * B + seq).reshape(-1),
        mask=mask,
        keys=(head * (B * max_keys) + seq_v * max_keys + key).reshape(-1),
        v_rows=(kv_head * (num_blocks * bs) + slot).reshape(-1),
        v_offsets=(head * seq_v.numel() + starts_v).reshape(-1),
    )


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch, scale: float
) -> torch.Tensor:
    """q [B, heads, head_dim] (one query per sequence) -> [B, heads, head_dim], reading the cache in place."""
    B, heads, dim = q.shape
    block_size = k_cache.shape[-1]
    q_rows = (q.transpose(0, 1) * scale).reshape(heads * B, dim)
    weights = q_rows.index_select(0, batch.k_owner).reshape(-1).to(k_cache.dtype)
    scores = F.embedding_bag(
        batch.k_rows,
        k_cache.view(-1, block_size),
        batch.k_offsets,
        mode="sum",
        per_sample_weights=weights,
    )  # [heads * B * max_blocks, block_size]
    probs = (scores.view(heads, B, -1).float() + batch.mask).softmax(dim=-1)
    out = F.embedding_bag(
        batch.v_rows,
        v_cache.view(-1, dim),
        batch.v_offsets,
        mode="sum",
        per_sample_weights=probs.view(-1).index_select(0, batch.keys).to(v_cache.dtype),
    )
    return out.view(heads, B, dim).transpose(0, 1).to(q.dtype)


@torch.library.custom_op("labkit::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_rows: torch.Tensor,
    k_offsets: torch.Tensor,
    k_owner: torch.Tensor,
    mask: torch.Tensor,
    keys: torch.Tensor,
    v_rows: torch.Tensor,
    v_offsets: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`decode_attention` as one opaque op for the compiled step (compiled_decode.py), as vLLM keeps its
    attention a custom op inside the graph: Inductor fuses everything around it and calls the ragged
    kernel as it is. The DecodeBatch's index tensors come in as arguments (built once per step, outside
    the graph); their lengths change with the context lengths, so the graph treats them as dynamic."""
    batch = DecodeBatch(q.new_empty(0), k_rows, k_offsets, k_owner, mask, keys, v_rows, v_offsets)
    return decode_attention(q, k_cache, v_cache, batch, scale).contiguous()


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, k_rows, k_offsets, k_owner, mask, keys, v_rows, v_offsets, scale):
    return torch.empty_like(q)


@dataclass
class PrefillSequence:
    """One sequence's prompt chunk: its queries are rows first .. first + length - 1 of the prefill tokens,
    at positions start .. start + length - 1, and they attend to keys 0 .. start + length - 1."""

    first: int
    length: int
    start: int
    blocks: torch.Tensor  # [blocks it needs] physical block ids, in order
    # [length, start + length] True = may attend; None = plain causal (start 0)
    mask: torch.Tensor | None


@dataclass
class PrefillBatch:
    """The sequences whose prompts (or chunks of them) this step feeds, each attended on its own."""

    token_index: torch.Tensor  # [Tg] positions of these tokens in the step's flat batch
    sequences: list[PrefillSequence]


def build_prefill_batch(
    token_index: list[int],
    starts: list[int],
    lengths: list[int],
    tables: list[list[int]],
    block_size: int,
    device,
) -> PrefillBatch:
    """Sequence b runs tokens at positions starts[b] .. starts[b] + lengths[b] - 1 (a prompt or a chunk of one)."""
    sequences, first = [], 0
    for start, n, table in zip(starts, lengths, tables):
        keys = start + n
        mask = None
        if start:  # a later chunk: its queries see every earlier key, then causal among themselves
            mask = (
                torch.arange(keys, device=device)
                <= torch.arange(start, keys, device=device)[:, None]
            )
        blocks = torch.tensor(table[: -(-keys // block_size)], device=device)
        sequences.append(PrefillSequence(first, n, start, blocks, mask))
        first += n
    return PrefillBatch(torch.tensor(token_index, device=device), sequences)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [Tg, heads, head_dim] -> [Tg, heads, head_dim]: each sequence gathers its own blocks and runs causal
    attention (`F.scaled_dot_product_attention`, grouped-query heads shared in place) over exactly its keys.
    One sequence at a time, not a batch padded to the longest prompt: padding costs B x longest^2, and one
    352-token prompt among 47 of about 46 tokens made that padded attention 3x the step's matmuls.
    k_scale, v_scale [kv_heads, slots]: a quantized cache's scales (kv_quant.py), None for a float cache."""
    kv_heads, num_blocks, dim, block_size = k_cache.shape
    v_blocks = v_cache.view(kv_heads, num_blocks, block_size, dim)
    out = torch.empty_like(q)
    for s in batch.sequences:
        keys = s.start + s.length
        # [kv_heads, blocks, block_size, dim] each: K is stored transposed within a block (kv_cache.py)
        k = k_cache.index_select(1, s.blocks).transpose(2, 3)
        v = v_blocks.index_select(1, s.blocks)
        k = as_float(k, gathered_scales(k_scale, s.blocks, block_size), q.dtype)
        v = as_float(v, gathered_scales(v_scale, s.blocks, block_size), q.dtype)
        rows = slice(s.first, s.first + s.length)
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1),  # [heads, length, dim]
            k.reshape(kv_heads, -1, dim)[:, :keys],  # [kv_heads, keys, dim]
            v.reshape(kv_heads, -1, dim)[:, :keys],
            attn_mask=s.mask,
            is_causal=s.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended.transpose(0, 1)
    return out


def padded_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention with static shapes, for the compiled step (compiled_decode.py): q [S, heads, D],
    tables [S, M] (each row's first M block ids, padded with any valid block), context_lens [S] -> [S, heads,
    D]. Gathers M whole blocks per row and masks the keys past each row's length: a few big ops whose shapes
    depend only on S and M, where `decode_attention`'s ragged bags depend on every length. It reads up to
    one block per row more than it needs; `decode_attention` stays the eager path's kernel for a float cache.
    k_scale, v_scale [kv_heads, slots]: a quantized cache's scales (kv_quant.py), None for a float cache."""
    S, M = tables.shape
    kv_heads, _, dim, block_size = k_cache.shape
    # [kv_heads, S, M, block, D] each: K is stored transposed within a block
    k = k_cache[:, tables].transpose(3, 4)
    v = v_cache.view(kv_heads, -1, block_size, dim)[:, tables]
    k = as_float(k, gathered_scales(k_scale, tables, block_size), q.dtype)
    v = as_float(v, gathered_scales(v_scale, tables, block_size), q.dtype)
    # -> [S, kv_heads, M * block, D]
    k = k.transpose(0, 1).reshape(S, kv_heads, M * block_size, dim)
    v = v.transpose(0, 1).reshape(S, kv_heads, M * block_size, dim)
    keys = torch.arange(M * block_size, device=q.device)
    mask = (keys < context_lens[:, None])[:, None, None, :]  # [S, 1, 1, M * block]: True = attend
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [S, heads, 1, D]: one query per row
        k,
        v,
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :]


def streamed_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`padded_decode_attention` for a float cache written as multiplies, sums and a softmax, for Inductor
    to fuse (the CPU's batch-1 graph, compiled_decode.py): q [S, heads, D], tables [S, M], context_lens [S]
    -> [S, heads, D]. Compiled, each of the two products becomes one loop that reads the keys and values
    through the block table where they lie in the cache; `padded_decode_attention` copies them out first
    and then calls the attention kernel. Measured per layer at batch 1 (SmolLM2's 9 query and 3 KV heads):
    17 us against 37 at 64 keys, 198 against 327 at 1,000. Eagerly it would materialise every product:
    compiled graphs only."""
    S, M = tables.shape
    kv_heads, _, dim, block_size = k_cache.shape
    group = q.shape[1] // kv_heads  # query heads per KV head
    k = k_cache[:, tables]  # [kv_heads, S, M, D, block]: K is stored transposed within a block
    v = v_cache.view(kv_heads, -1, block_size, dim)[:, tables]  # [kv_heads, S, M, block, D]
    q = q.view(S, kv_heads, group, dim).transpose(0, 1)  # [kv_heads, S, group, D]
    # [kv_heads, S, group, M, block]: each query against each key, summed over D
    scores = (q[:, :, :, None, :, None] * k[:, :, None]).sum(-2) * scale
    scores = scores.reshape(kv_heads, S, group, M * block_size)
    keys = torch.arange(M * block_size, device=q.device)
    attend = (keys < context_lens[:, None])[None, :, None, :]  # [1, S, 1, M * block]
    probs = scores.masked_fill(~attend, float("-inf")).softmax(dim=-1)
    probs = probs.view(kv_heads, S, group, M, block_size, 1)
    out = (probs * v[:, :, None]).sum((-3, -2))  # [kv_heads, S, group, D]
    return out.transpose(0, 1).reshape(S, kv_heads * group, dim)


def gathered_scales(
    scale: torch.Tensor | None, blocks: torch.Tensor, block_size: int
) -> torch.Tensor | None:
    """A quantized cache's scales [kv_heads, slots] of the slots of `blocks` (block ids, any shape) ->
    [kv_heads, *blocks.shape, block_size]; None for a float cache."""
    if scale is None:
        return None
    return scale.view(scale.shape[0], -1, block_size)[:, blocks]


def as_float(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache rows x [..., D] as `dtype`: a float cache's cast, a quantized cache's dequantized with
    their scales [...] (kv_quant.py)."""
    return x.to(dtype) if scale is None else dequantize(x, scale, dtype)


@dataclass
class PaddedDecodeBatch:
    """One step's decode tokens for `padded_decode_attention`, the eager kernel of a quantized cache:
    each sequence's block table padded to the longest (block 0 fills: masked out by context_lens)."""

    token_index: torch.Tensor  # [B] positions of the decode tokens in the step's flat batch
    tables: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B] keys each attends to, its own included


def build_padded_decode_batch(
    token_index: list[int],
    context_lens: list[int],
    tables: list[list[int]],
    block_size: int,
    device,
) -> PaddedDecodeBatch:
    return PaddedDecodeBatch(
        torch.tensor(token_index, device=device),
        torch.tensor(padded_tables(context_lens, tables, block_size), device=device),
        torch.tensor(context_lens, device=device),
    )


def padded_tables(
    context_lens: list[int], tables: list[list[int]], block_size: int, min_blocks: int = 1
) -> list[list[int]]:
    """Each block table cut or padded to the longest row's blocks (at least min_blocks), with block 0:
    `padded_decode_attention` masks every key past a row's length, so the filler is never read."""
    width = max(min_blocks, -(-max(context_lens) // block_size))
    return [t[:width] + [0] * (width - len(t[:width])) for t in tables]
