"""Paged KV memory bookkeeping: which physical block holds which sequence's tokens (PagedAttention's idea).

The KV cache is cut into `num_blocks` blocks of `block_size` token slots. A sequence owns a *block table*
(logical block i -> physical block id) and grows one block at a time, so at most `block_size - 1` slots
per sequence are ever wasted, instead of reserving `max_context` slots up front.

Prefix caching: a full block is named by a hash of (hash of the block before it, its tokens), i.e. by the
whole prefix up to its end. A new sequence whose prompt starts with the same full blocks shares them
(reference count + 1) instead of recomputing them. Freed blocks keep their contents and hash until they
are handed out again (least recently freed first), so a later request can still hit them.
"""

from collections import OrderedDict

from .sequence import Sequence


def block_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # eviction order
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}  # physical block -> hash of the prefix it holds
        self.block_of: dict[int, int] = {}  # hash -> physical block (the prefix cache)
        self.cache_queries = self.cache_hits = 0  # prompt blocks looked up / found

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ---------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        # least recently freed: its cached prefix is the stalest
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None and self.block_of.get(old) == block:
            del self.block_of[old]
        self.ref_count[block] = 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding this sequence's leading full blocks. The last token is never
        taken from the cache: its forward pass is what produces the next token's logits."""
        if not self.enable_prefix_caching:
            return []
        found, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.block_of.get(h)
            if block is None:
                break
            found.append(block)
            parent = h
        return found

    def can_allocate(self, seq: Sequence) -> bool:
        cached = self._cached_prefix(seq)
        # hits that still count as free
        reusable_free = sum(1 for b in cached if self.ref_count[b] == 0)
        return self.num_free - reusable_free >= self.blocks_needed(seq.num_tokens) - len(cached)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not self.can_allocate(seq):
            raise RuntimeError("allocate() without enough free blocks; call can_allocate() first")
        cached = self._cached_prefix(seq)
        n_full_prompt_blocks = (seq.num_tokens - 1) // self.block_size
        self.cache_queries += n_full_prompt_blocks
        self.cache_hits += len(cached)
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self.hash_of[block])
        for _ in range(self.blocks_needed(seq.num_tokens) - len(cached)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size

    def can_append(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """Enough free blocks for the sequence to hold `num_tokens` (default: all its tokens)?"""
        need = self.blocks_needed(seq.num_tokens if num_tokens is None else num_tokens) - len(
            seq.block_table
        )
        return need <= self.num_free

    def append(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow the block table to cover `num_tokens` slots (a decode step adds a block every block_size)."""
        need = self.blocks_needed(seq.num_tokens if num_tokens is None else num_tokens) - len(
            seq.block_table
        )
        if need > self.num_free:
            raise RuntimeError("append() without a free block; call can_append() first")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward pass: name every newly *computed* full block so later prompts can share it."""
        if not self.enable_prefix_caching:
            return
        while len(seq.block_hashes) < seq.num_computed_tokens // self.block_size:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.block_of and block not in self.hash_of:
                self.block_of[h], self.hash_of[block] = block, h

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished, aborted or preempted). Shared blocks stay with the others."""
        # tail first: the prefix blocks are the likeliest reused
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} freed twice"
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    # ---- invariants (the tests call this after every operation) ----------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        owners = [0] * self.num_blocks
        for seq in live:
            assert len(seq.block_table) == len(set(seq.block_table)), (
                f"{seq.request_id} lists a block twice"
            )
            for b in seq.block_table:
                owners[b] += 1
        for b in range(self.num_blocks):
            assert owners[b] == self.ref_count[b], (
                f"block {b}: ref_count {self.ref_count[b]} but {owners[b]} owners"
            )
            assert (b in self.free) == (owners[b] == 0), f"block {b}: free-list membership wrong"
        for h, b in self.block_of.items():
            assert self.hash_of.get(b) == h, "prefix-cache maps disagree"

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cache_hits / self.cache_queries if self.cache_queries else 0.0
