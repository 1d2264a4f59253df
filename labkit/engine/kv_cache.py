"""The KV cache's size: a formula you can check against real tensors, and the paged storage itself.

Every generated token leaves behind, in every layer, one key and one value vector per KV head:

    bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element

That is the number that decides how many sequences fit in memory at once, hence the batch size.
"""

from dataclasses import dataclass

import torch

from ..model import context_length


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int

    @classmethod
    def of(cls, model) -> "KVShape":
        cfg = model.config
        heads = cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            max_context=context_length(model),
        )


def kv_bytes_per_token(shape: KVShape, dtype: torch.dtype) -> int:
    return (
        2
        * shape.num_layers
        * shape.num_kv_heads
        * shape.head_dim
        * torch.empty((), dtype=dtype).element_size()
    )


def default_num_blocks(
    shape: KVShape,
    per_token: int,
    block_size: int,
    max_num_seqs: int,
    device: torch.device,
    gpu_memory_fraction: float = 0.5,
    cpu_budget_bytes: int = 2 << 30,
) -> int:
    """Enough blocks for `max_num_seqs` sequences at full context, capped by a memory budget
    (half the free GPU memory, or 2 GiB of RAM on a CPU - vLLM's CPU backend also uses a fixed budget).
    per_token: the cache's bytes per token (kv_quant.bytes_per_token: a quantized cache's scales included)."""
    per_block = per_token * block_size
    wanted = max_num_seqs * -(-shape.max_context // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * gpu_memory_fraction)
    else:
        budget = cpu_budget_bytes
    return max(1, min(wanted, budget // per_block))


class PagedKVCache:
    """Per layer, one K and one V tensor holding `num_blocks` blocks of `block_size` tokens each; the token
    in slot `block * block_size + offset` has
        its value at  v[head, block * block_size + offset, :]     ([kv_heads, slots, head_dim])
        its key at    k[head, block, :, offset]                   ([kv_heads, num_blocks, head_dim, block_size])
    Head-major, so one head's block is a contiguous tile (cheap to read); K is transposed within each block
    so that decode attention can compute scores straight from it (see attention.py). Zero-initialised so
    that masked-out slots can never inject NaNs into attention."""

    quantized = False  # 8-bit codes with scales (kv_quant.QuantizedKVCache) or float values

    def __init__(
        self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device
    ):
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        h, d = shape.num_kv_heads, shape.head_dim
        self.k = [
            torch.zeros(h, num_blocks, d, block_size, dtype=dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        self.v = [
            torch.zeros(h, num_blocks * block_size, d, dtype=dtype, device=device)
            for _ in range(shape.num_layers)
        ]

    def write_index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where tokens in `slots` [T] go: flat indices into one head of K ([T * head_dim], token-major) and
        of V ([T]); computed once per step, used by every layer's `write`."""
        d, bs = self.shape.head_dim, self.block_size
        k_index = ((slots // bs) * (d * bs) + slots % bs)[:, None] + torch.arange(
            d, device=slots.device
        ) * bs
        return k_index.reshape(-1), slots

    def write(
        self, layer: int, index: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ):
        """Store this step's keys and values k, v [T, kv_heads, head_dim] of `layer` at `index` (write_index)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        h = k_cache.shape[0]
        k_cache.view(h, -1).index_copy_(
            1, index[0], k.transpose(0, 1).reshape(h, -1).to(k_cache.dtype)
        )
        v_cache.index_copy_(1, index[1], v.transpose(0, 1).to(v_cache.dtype))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy the contents of block src into block dst, in every layer, for each (src, dst): a
        copy-on-write of a block that forked samples shared (block_manager.py)."""
        if not copies:
            return
        src, dst = (torch.tensor(x, device=self.k[0].device) for x in zip(*copies))
        bs = self.block_size
        src_slots = (src[:, None] * bs + torch.arange(bs, device=src.device)).reshape(-1)
        dst_slots = (dst[:, None] * bs + torch.arange(bs, device=dst.device)).reshape(-1)
        for k, v in zip(self.k, self.v):
            k[:, dst] = k[:, src]
            v[:, dst_slots] = v[:, src_slots]

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer's K and V scales: none here; a quantized cache (kv_quant.py) has one per slot and head."""
        return None, None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what the compiled step must keep at a fixed address on a GPU)."""
        return self.k + self.v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
