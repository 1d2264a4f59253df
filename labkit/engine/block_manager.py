"""Paged KV memory bookkeeping: which physical block holds which sequence's tokens (PagedAttention's idea).

The KV cache is cut into `num_blocks` blocks of `block_size` token slots. A sequence owns a *block table*
(logical block i -> physical block id) and grows one block at a time, so at most `block_size - 1` slots
per sequence are ever wasted, instead of reserving `max_context` slots up front.

A block can be shared: `ref_count[b]` says by how many sequences. Two things share blocks:
- Prefix caching: a full block is named by its *key*, (hash of the prefix before it, its tokens), i.e. by
  the whole prefix up to its end. A sequence's first block starts from its LoRA adapter (Sequence.prefix_root)
  instead of None: the same tokens under two adapters have different K/V, so they never share a block. A new sequence whose prompt starts with the same full blocks shares them
  instead of recomputing them. The cache is a dict keyed by the key itself, so a lookup compares the
  tokens (a hash collision alone can never hand out another prompt's block). Freed blocks keep their
  contents and key until they are handed out again (least recently freed first), so a later request can
  still hit them.
- Parallel sampling (n > 1): the n samples of one prompt `fork` from the sequence that prefilled it and
  share all its blocks, the last partial one included (vLLM paper, section 4.4). A sequence about to write
  into a block it shares gets its own copy first (copy-on-write); the engine copies the contents in the
  KV cache before the next forward pass (`take_copies`).
Invariants (check_invariants, called by the tests after every operation): a block's ref_count equals the
number of live block tables listing it; it is on the free list exactly when that is 0; both prefix-cache
maps agree; a sequence holds blocks for its computed tokens and none past its last token, and names only
full, computed blocks (what a speculative rollback, `truncate`, must leave behind).
"""

from collections import OrderedDict

from .sequence import Sequence

# what names a full block in the prefix cache: (hash of the blocks before it, or for the first block the
# sequence's adapter, its token ids)
BlockKey = tuple[int | str | None, tuple[int, ...]]


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
        self.key_of: dict[int, BlockKey] = {}  # physical block -> the prefix it holds
        self.block_of: dict[BlockKey, int] = {}  # prefix -> physical block (the prefix cache)
        self.copies: list[
            tuple[int, int]
        ] = []  # copy-on-write (src, dst) not yet made in the cache
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
        old = self.key_of.pop(block, None)
        if old is not None and self.block_of.get(old) == block:
            del self.block_of[old]
        self.ref_count[block] = 1
        return block

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding this sequence's leading full blocks. The last token is never
        taken from the cache: its forward pass is what produces the next token's logits. A sequence that
        still needs its prompt's logprobs takes nothing: every prompt position has to run."""
        seq.block_size = self.block_size  # its block helpers count in this cache's blocks
        if not self.enable_prefix_caching or seq.wants_prompt_logits:
            return []
        found: list[int] = []
        parent: int | str | None = seq.prefix_root
        for i in range((seq.num_tokens - 1) // self.block_size):
            key = (parent, tuple(seq.block(i)))
            block = self.block_of.get(key)  # the dict compares the tokens, not just a hash
            if block is None:
                break
            found.append(block)
            parent = hash(key)
        return found

    def can_allocate(self, seq: Sequence, cached: list[int] | None = None) -> bool:
        """Enough free blocks for `seq`, given its `cached` prefix blocks (default: look them up)?"""
        if cached is None:
            cached = self.cached_prefix(seq)
        # hits that still count as free
        reusable_free = sum(1 for b in cached if self.ref_count[b] == 0)
        return self.num_free - reusable_free >= self.blocks_needed(seq.num_tokens) - len(cached)

    def allocate(self, seq: Sequence, cached: list[int] | None = None) -> None:
        """Give a waiting sequence blocks for all its current tokens, starting with its `cached` prefix
        blocks (the scheduler looks them up once per admission with cached_prefix)."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if cached is None:
            cached = self.cached_prefix(seq)
        if not self.can_allocate(seq, cached):
            raise RuntimeError("allocate() without enough free blocks; call can_allocate() first")
        self.cache_queries += (seq.num_tokens - 1) // self.block_size
        self.cache_hits += len(cached)
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(hash(self.key_of[block]))
        for _ in range(self.blocks_needed(seq.num_tokens) - len(cached)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(cached) * self.block_size

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (and what is computed in them); see copy_on_write."""
        assert not child.block_table, f"{child.request_id} already holds blocks"
        for block in parent.block_table:
            self.ref_count[block] += 1
        child.block_table, child.block_hashes = list(parent.block_table), list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_size = self.block_size

    def _new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to take for `seq` to write its tokens up to `num_tokens`: new ones at the end, plus one
        copy if the first block it writes into is shared (only a forked, partial block can be)."""
        first = seq.num_computed_tokens // self.block_size
        shared = first < len(seq.block_table) and self.ref_count[seq.block_table[first]] > 1
        return self.blocks_needed(num_tokens) - len(seq.block_table) + shared

    def can_append(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """Enough free blocks for the sequence to hold `num_tokens` (default: all its tokens)?"""
        return self._new_blocks(seq, seq.num_tokens if num_tokens is None else num_tokens) <= (
            self.num_free
        )

    def append(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow the block table to cover `num_tokens` slots (a decode step adds a block every block_size),
        copying first a shared block it is about to write into."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        if self._new_blocks(seq, num_tokens) > self.num_free:
            raise RuntimeError("append() without a free block; call can_append() first")
        self._copy_on_write(seq)
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def _copy_on_write(self, seq: Sequence) -> None:
        i = seq.num_computed_tokens // self.block_size
        if i < len(seq.block_table) and self.ref_count[seq.block_table[i]] > 1:
            old, new = seq.block_table[i], self._take_free_block()
            self.ref_count[old] -= 1
            seq.block_table[i] = new
            self.copies.append((old, new))

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies that copy-on-write asked for since the last call."""
        copies, self.copies = self.copies, []
        return copies

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward pass: name every newly *computed* full block so later prompts can share it."""
        if not self.enable_prefix_caching:
            return
        while len(seq.block_hashes) < seq.num_computed_tokens // self.block_size:
            i = len(seq.block_hashes)
            key = (
                seq.block_hashes[-1] if seq.block_hashes else seq.prefix_root,
                tuple(seq.block(i)),
            )
            seq.block_hashes.append(hash(key))
            block = seq.block_table[i]
            if key not in self.block_of and block not in self.key_of:
                self.block_of[key], self.key_of[block] = block, key

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

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll a sequence back to its first `num_tokens` slots (speculative decoding's rejected tokens):
        blocks past them go back to the free list. Call before register_full_blocks names any block that
        held a rejected token: a kept block keeps only its name for the full blocks before `num_tokens`."""
        keep = self.blocks_needed(num_tokens)
        for block in reversed(seq.block_table[keep:]):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} freed twice"
            if self.ref_count[block] == 0:
                self.free[block] = None
        del seq.block_table[keep:]
        del seq.block_hashes[num_tokens // self.block_size :]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

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
        for key, b in self.block_of.items():
            assert self.key_of.get(b) == key, "prefix-cache maps disagree"
            assert len(key[1]) == self.block_size, "only full blocks are cached"
        for seq in live:
            assert len(seq.block_table) >= self.blocks_needed(seq.num_computed_tokens), (
                f"{seq.request_id}: computed tokens outside its blocks"
            )
            assert len(seq.block_table) <= max(self.blocks_needed(seq.num_tokens), 1), (
                f"{seq.request_id} holds blocks past its last token (a rollback left them behind)"
            )
            assert len(seq.block_hashes) <= seq.num_computed_tokens // self.block_size, (
                f"{seq.request_id} names a block that is not fully computed"
            )

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cache_hits / self.cache_queries if self.cache_queries else 0.0
