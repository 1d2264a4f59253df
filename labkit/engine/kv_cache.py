"""The KV cache's size: a formula you can check against real tensors, and the paged storage itself.

Every generated token leaves behind, in every layer, one key and one value vector per KV head:

    bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element

That is the number that decides how many sequences fit in memory at once, hence the batch size.
"""
from dataclasses import dataclass

import torch


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
        return cls(num_layers=cfg.num_hidden_layers,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   max_context=int(getattr(cfg, "max_position_embeddings", 2048)))


def kv_bytes_per_token(shape: KVShape, dtype: torch.dtype) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()


def default_num_blocks(shape: KVShape, dtype: torch.dtype, block_size: int, max_num_seqs: int,
                       device: torch.device, gpu_memory_fraction: float = 0.5, cpu_budget_bytes: int = 2 << 30) -> int:
    """Enough blocks for `max_num_seqs` sequences at full context, capped by a memory budget
    (half the free GPU memory, or 2 GiB of RAM on a CPU - vLLM's CPU backend also uses a fixed budget)."""
    per_block = kv_bytes_per_token(shape, dtype) * block_size
    wanted = max_num_seqs * -(-shape.max_context // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * gpu_memory_fraction)
    else:
        budget = cpu_budget_bytes
    return max(1, min(wanted, budget // per_block))


class PagedKVCache:
    """Per layer, one K and one V tensor of shape [kv_heads, num_blocks * block_size, head_dim]: slot
    `block * block_size + offset` holds one token. Head-major, so one head's block is a contiguous
    [block_size, head_dim] tile (cheap to gather). Zero-initialised so that masked-out slots can never
    inject NaNs into attention."""

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        slots = num_blocks * block_size
        self.k = [torch.zeros(shape.num_kv_heads, slots, shape.head_dim, dtype=dtype, device=device)
                  for _ in range(shape.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
