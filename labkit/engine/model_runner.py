"""A forward pass over a *flat* batch of tokens from many sequences, reading and writing the paged KV cache.

Hugging Face's `model(...)` wants rectangular [batch, seq] inputs and its own cache object. A serving
engine instead packs whatever each sequence needs this step - a whole prompt, a chunk of one, or a single
decode token - into one list of T tokens. Linear layers (almost all the FLOPs) do not care which sequence a
token belongs to: they run once on [T, hidden]. Only attention does, and it reads each sequence's past keys
and values through its block table.

We reuse the model's own weights and modules (embeddings, projections, norms, MLP, rotary embedding), so
this works for the course model and Llama-family hub models (Llama, Mistral, Qwen2, ...).
"""
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .fast_layers import FastLayer, RotaryTable, fast_rms_norm, fused_linear
from .kv_cache import KVShape, PagedKVCache


def check_supported(model) -> None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj") \
            or not hasattr(inner, "rotary_emb"):
        raise ValueError(f"labkit.engine runs Llama-family decoders (Llama, Mistral, Qwen2, the course model); "
                         f"{type(model).__name__} has a different layout. Use its `generate` or vLLM instead.")


@dataclass
class AttentionGroup:
    """Sequences whose attention is computed together, padded to [B, max_q] queries x [B, max_k] keys."""
    token_index: torch.Tensor    # [Tg] positions of this group's tokens in the flat batch
    pad_index: torch.Tensor      # [Tg] where each token sits in the padded [B * max_q] query layout
    block_tables: torch.Tensor   # [B, max_blocks] physical block ids (padded with 0: masked out anyway)
    mask: torch.Tensor           # [B, max_q, max_k] additive: 0 = may attend, -inf = may not
    batch: int
    max_q: int


@dataclass
class StepInput:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T] position of each token in its own sequence
    slot_mapping: torch.Tensor   # [T] cache slot each token's K/V is written to
    groups: list[AttentionGroup]
    logits_index: torch.Tensor   # [S] flat index of the last token of each sequence that samples this step


def split_by_length(members: list[int], chunks, block_size: int) -> list[list[int]]:
    """Padding every sequence to the longest one's blocks makes a short sequence in a batch with a long one
    pay for the long one's gather and attention. Sort by length and cut into two groups where that saves
    at least a quarter of the padded work (one extra group costs a little fixed overhead)."""
    if len(members) < 4:
        return [members]
    blocks = {i: -(-(chunks[i][1] + len(chunks[i][0])) // block_size) for i in members}
    order = sorted(members, key=blocks.get)
    n, whole = len(order), len(order) * blocks[order[-1]]
    cost, k = min((j * blocks[order[j - 1]] + (n - j) * blocks[order[-1]], j) for j in range(1, n))
    return [order[:k], order[k:]] if cost < 0.75 * whole else [members]


def build_step_input(chunks: list[tuple[list[int], int, list[int]]], sample_flags: list[bool], block_size: int,
                     device) -> StepInput:
    """chunks[i] = (token ids to run, position of the first one, the sequence's block table).
    Decode chunks (1 token) and prefill chunks are grouped separately so a long prompt does not make
    every decode token pay for max_q padded queries."""
    ids, pos, slots, logits_index = [], [], [], []
    decode, prefill = [], []
    for i, (tokens, start, table) in enumerate(chunks):
        (decode if len(tokens) == 1 else prefill).append(i)
        first = len(ids)
        for j, t in enumerate(tokens):
            p = start + j
            ids.append(t)
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        if sample_flags[i]:
            logits_index.append(len(ids) - 1)
        chunks[i] = (tokens, start, table, first)
    groups = []
    for members in split_by_length(decode, chunks, block_size) + [prefill]:
        if not members:
            continue
        max_q = max(len(chunks[i][0]) for i in members)
        ctx = [chunks[i][1] + len(chunks[i][0]) for i in members]
        max_blocks = -(-max(ctx) // block_size)
        token_index, pad_index, tables, qpos = [], [], [], []
        for b, i in enumerate(members):
            tokens, start, table, first = chunks[i]
            n = len(tokens)
            token_index += range(first, first + n)
            pad_index += range(b * max_q, b * max_q + n)
            need = -(-(start + n) // block_size)
            tables.append(table[:need] + [0] * (max_blocks - need))
            qpos.append(list(range(start, start + n)) + [0] * (max_q - n))  # padded queries look at key 0
        key_pos = torch.arange(max_blocks * block_size, device=device)
        qpos_t = torch.tensor(qpos, device=device)
        groups.append(AttentionGroup(
            token_index=torch.tensor(token_index, device=device), pad_index=torch.tensor(pad_index, device=device),
            block_tables=torch.tensor(tables, device=device),
            mask=torch.zeros(qpos_t.shape + key_pos.shape, device=device).masked_fill(
                key_pos[None, None, :] > qpos_t[:, :, None], float("-inf")), batch=len(members), max_q=max_q))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return StepInput(t(ids), t(pos), t(slots), groups, t(logits_index))


def paged_attention(q, k_cache, v_cache, group: AttentionGroup, block_size: int, scale: float, workspace=None):
    """q [Tg, H, D] -> [Tg, H, D] for one group of sequences.

    The cache is stored head-major, [kv_heads, slots, head_dim], so gathering a sequence's blocks gives,
    per head, one contiguous [keys, head_dim] matrix; attention is then two batched matmuls over
    (head, sequence) pairs with an additive mask (causal + padding). vLLM's PagedAttention kernel reads the
    blocks in place instead of gathering them; in plain PyTorch the gather is the price of paging.
    `workspace` = two preallocated flat buffers: reusing them avoids allocating (and page-faulting in)
    megabytes of fresh memory for every layer of every step."""
    _, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    B, max_q = group.batch, group.max_q
    blocks = group.block_tables.view(-1)
    row = block_size * dim
    n = kv_heads * blocks.numel() * row

    def gather(cache, buf):
        # index_select on a [kv_heads, num_blocks, block_size * dim] view copies whole blocks (one memcpy per
        # block and head): several times faster on a CPU than advanced indexing, which goes element by element
        out = buf[:n].view(kv_heads, blocks.numel(), row) if buf is not None else None
        kv = torch.index_select(cache.view(kv_heads, -1, row), 1, blocks, out=out)
        kv = kv.view(kv_heads, 1, B, -1, dim)
        if heads != kv_heads:       # grouped-query attention: each KV head serves heads // kv_heads query heads
            kv = kv.expand(kv_heads, heads // kv_heads, B, kv.shape[3], dim)
        return kv.reshape(heads * B, -1, dim)

    k = gather(k_cache, workspace[0] if workspace else None)
    v = gather(v_cache, workspace[1] if workspace else None)
    if max_q == 1:      # decode: one query per sequence, nothing to pad
        padded = q
    else:
        padded = q.new_zeros(B * max_q, heads, dim)
        padded[group.pad_index] = q
    qh = (padded * scale).view(B, max_q, heads, dim).permute(2, 0, 1, 3).reshape(heads * B, max_q, dim)
    scores = torch.bmm(qh, k.transpose(1, 2)).view(heads, B, max_q, -1)
    probs = (scores.float() + group.mask).softmax(dim=-1).to(v.dtype).view(heads * B, max_q, -1)
    out = torch.bmm(probs, v).view(heads, B, max_q, dim).permute(1, 2, 0, 3).reshape(B * max_q, heads, dim)
    return out if max_q == 1 else out[group.pad_index]


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache):
        check_supported(model)
        self.model, self.cache = model, cache
        self.shape: KVShape = cache.shape
        self.block_size = cache.block_size
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.device = next(model.parameters()).device
        self.workspace = None      # gather buffers, grown on demand and then reused
        inner = model.model
        dtype = next(model.parameters()).dtype
        self.layers = [FastLayer(layer) for layer in inner.layers]
        self.rotary = RotaryTable(inner.rotary_emb, self.shape.max_context, dtype, self.device)
        self.final_norm = fast_rms_norm(inner.norm)
        # on a CPU the [vocab, hidden] output layer is the largest matmul of a decode step: pre-pack it too
        head = fused_linear([model.lm_head])
        self.lm_head = lambda x: head(x)[0]

    def _workspace(self, groups: list[AttentionGroup]):
        per_block = self.shape.num_kv_heads * self.block_size * self.shape.head_dim
        need = max(g.block_tables.numel() for g in groups) * per_block
        if self.workspace is None or self.workspace[0].numel() < need:
            size = max(need, 2 * (self.workspace[0].numel() if self.workspace else 0), 64 * per_block)
            self.workspace = tuple(torch.empty(size, dtype=self.cache.k[0].dtype, device=self.device) for _ in range(2))
        return self.workspace

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Run all tokens, write their K/V into the cache, return logits [S, vocab] for the sampled ones."""
        hidden = self.model.model.embed_tokens(step.input_ids)                # [T, hidden]
        cos, sin = self.rotary(hidden, step.positions)                       # [T, head_dim]
        T, D, H, Hkv = hidden.shape[0], self.shape.head_dim, self.num_heads, self.shape.num_kv_heads
        ws = self._workspace(step.groups)
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            q, k, v = layer.qkv(layer.input_norm(hidden))
            q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]
            # write this step's K/V into their slots (cache layout [kv_heads, slots, head_dim])
            k_cache.index_copy_(1, step.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
            v_cache.index_copy_(1, step.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))
            scale = getattr(attn, "scaling", D ** -0.5)
            if len(step.groups) == 1 and step.groups[0].token_index.numel() == T:
                out = paged_attention(q, k_cache, v_cache, step.groups[0], self.block_size, scale, ws)
            else:
                out = torch.empty_like(q)
                for g in step.groups:
                    out[g.token_index] = paged_attention(q[g.token_index], k_cache, v_cache, g, self.block_size,
                                                        scale, ws)
            hidden = hidden + layer.o(out.reshape(T, H * D))[0]
            hidden = hidden + layer.mlp(layer.post_norm(hidden))
        return self.lm_head(self.final_norm(hidden[step.logits_index]))
