"""Exercise checks for notebooks 04-06 (see labkit.checks: each returns the student's function if it is
right, else labkit's reference, so the notebook always runs to the end)."""

import copy
from dataclasses import dataclass

import torch

from ..checks import ExerciseFailure, expect_close, run_check
from .baselines import generate_no_cache
from .speculative import accept_greedy as reference_accept_greedy


# ---- notebook 04 -----------------------------------------------------------------------------
def reference_kv_cache_bytes(num_layers, num_kv_heads, head_dim, num_tokens, bytes_per_element):
    return 2 * num_layers * num_kv_heads * head_dim * num_tokens * bytes_per_element


def check_kv_cache_bytes(student):
    def test(fn):
        for args in [
            (4, 4, 64, 1, 4),
            (32, 32, 128, 4096, 2),
            (32, 8, 128, 100, 2),
            (1, 1, 1, 1, 1),
        ]:
            expect_close(
                fn(*args), reference_kv_cache_bytes(*args), f"kv_cache_bytes{args}", rel=0, abs_=0.5
            )

    return run_check("kv_cache_bytes", student, reference_kv_cache_bytes, test)


@torch.inference_mode()
def reference_greedy_with_cache(model, prompt_ids, n):
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    cache, new = out.past_key_values, []
    for _ in range(n):
        token = out.logits[0, -1].argmax()
        new.append(int(token))
        out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
    return new


def check_greedy_with_cache(student, model, prompt_ids, n: int = 20):
    def test(fn):
        got = fn(model, prompt_ids, n)
        want = generate_no_cache(model, prompt_ids, n)
        if got is None:
            raise ExerciseFailure("returned None (did you forget `return`?)")
        got = [int(t) for t in got]
        if len(got) != n:
            raise ExerciseFailure(f"asked for {n} tokens, got {len(got)}")
        if got != want:
            first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            raise ExerciseFailure(
                f"token {first} differs from uncached greedy decoding ({got[first]} vs {want[first]}): "
                "feed only the newest token, together with the cache"
            )

    return run_check("greedy_with_cache", student, reference_greedy_with_cache, test)


# ---- notebook 05 -----------------------------------------------------------------------------
def reference_slot_for(block_table, position, block_size):
    return block_table[position // block_size] * block_size + position % block_size


def check_slot_for(student):
    def test(fn):
        cases = [
            ([7], 0, 16),
            ([7], 15, 16),
            ([3, 9, 1], 16, 16),
            ([3, 9, 1], 40, 16),
            ([5, 2], 3, 2),
            ([0, 4], 1, 1),
        ]
        for table, pos, bs in cases:
            want = reference_slot_for(table, pos, bs)
            got = fn(table, pos, bs)
            if got is None or int(got) != want:
                raise ExerciseFailure(
                    f"slot_for({table}, position={pos}, block_size={bs}): expected {want}, got {got}"
                )

    return run_check("slot_for", student, reference_slot_for, test)


def reference_static_batch_work(output_lengths, batch_size):
    total = 0
    for start in range(0, len(output_lengths), batch_size):
        batch = output_lengths[start : start + batch_size]
        total += len(batch) * max(batch)
    return total


def check_static_batch_work(student):
    def test(fn):
        cases = [
            ([5], 4),
            ([1, 2, 3, 4], 4),
            ([1, 2, 3, 4], 2),
            ([10, 1, 1, 1, 1], 2),
            ([8] * 7, 3),
            ([3, 200, 7], 1),
        ]
        for lengths, bs in cases:
            want = reference_static_batch_work(lengths, bs)
            got = fn(list(lengths), bs)
            if got is None or int(got) != want:
                raise ExerciseFailure(
                    f"static_batch_work({lengths}, batch_size={bs}): expected {want}, got {got}"
                )

    return run_check("static_batch_work", student, reference_static_batch_work, test)


# ---- notebook 05: the scheduler's step, over plain data ---------------------------------------------
@dataclass
class SeqState:
    """What the scheduler needs to know of a sequence: `num_tokens` known (prompt + generated so far),
    `num_computed` of them already in the KV cache, and `num_blocks` KV blocks held."""

    name: str
    num_tokens: int
    num_computed: int = 0
    num_blocks: int = 0


def reference_schedule(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
    """One step of labkit/engine/scheduler.py (no prefix cache, one sample per request), over SeqStates.

    running: list[SeqState], oldest first; waiting: list[SeqState], first come first; both are updated
    in place (blocks taken, preempted sequences moved to the front of `waiting`, admitted ones to the
    end of `running`). Returns (chunks, preempted, free_blocks): chunks is [(name, num_tokens)] in
    scheduling order, preempted the names preempted, newest first; free_blocks what is left."""
    chunks, preempted, scheduled = [], [], set()
    for seq in list(running):
        if token_budget == 0:
            break
        if seq not in running:  # preempted earlier in this step
            continue
        n = min(seq.num_tokens - seq.num_computed, token_budget)
        need = -(-(seq.num_computed + n) // block_size) - seq.num_blocks
        while need > free_blocks:  # preempt the newest sequence not yet scheduled (maybe `seq`)
            victim = next(s for s in reversed(running) if s.name not in scheduled)
            running.remove(victim)
            free_blocks += victim.num_blocks
            victim.num_blocks = victim.num_computed = 0
            waiting.insert(0, victim)
            preempted.append(victim.name)
            if victim is seq:
                break
        if seq not in running:
            continue
        free_blocks -= need
        seq.num_blocks += need
        chunks.append((seq.name, n))
        scheduled.add(seq.name)
        token_budget -= n
    while waiting and not preempted and token_budget > 0 and len(running) < max_num_seqs:
        seq = waiting[0]
        need = -(-seq.num_tokens // block_size)  # blocks for all its tokens, at admission
        if need > free_blocks:
            break  # first come, first served: nobody overtakes it
        waiting.pop(0)
        free_blocks -= need
        seq.num_blocks = need
        running.append(seq)
        n = min(seq.num_tokens - seq.num_computed, token_budget)
        chunks.append((seq.name, n))
        scheduled.add(seq.name)
        token_budget -= n
    return chunks, preempted, free_blocks


# (running, waiting, free_blocks, block_size, max_num_seqs, token_budget, what a wrong answer missed)
def _schedule_cases():
    S = SeqState
    return [
        (
            [S("a", 20, 19, 2), S("b", 9, 8, 1)],
            [S("c", 12), S("d", 5)],
            10,
            16,
            8,
            64,
            "running sequences decode first (one token each), then waiting ones are admitted in order",
        ),
        (
            [S("a", 30, 29, 2)],
            [S("c", 100), S("d", 4)],
            20,
            16,
            8,
            40,
            "a prompt longer than what is left of the token budget gets only that much this step "
            "(chunked prefill), and the budget then stops admission",
        ),
        (
            [S("a", 33, 32, 2), S("b", 17, 16, 1)],
            [S("c", 5)],
            1,
            16,
            8,
            64,
            "each sequence crossing into a new block takes one; with none left, preempt the *newest* "
            "running sequence (not the oldest), and admit nobody in a step that preempted",
        ),
        (
            [S("a", 33, 32, 2), S("b", 40, 32, 2)],
            [],
            0,
            16,
            8,
            64,
            "when the newest sequence is the one that needs a block, it preempts itself: it goes back to "
            "the front of the queue and is not scheduled",
        ),
        (
            [],
            [S("c", 200), S("d", 3)],
            4,
            16,
            8,
            512,
            "first come, first served: a sequence that does not fit blocks the ones behind it",
        ),
        (
            [S("a", 6, 5, 1), S("b", 6, 5, 1)],
            [S("c", 3), S("d", 3)],
            10,
            16,
            3,
            64,
            "at most max_num_seqs sequences run at once, those already running included",
        ),
    ]


def _state(seqs):
    return [(s.name, s.num_tokens, s.num_computed, s.num_blocks) for s in seqs]


def check_schedule(student):
    def test(fn):
        for running, waiting, free, bs, max_seqs, budget, hint in _schedule_cases():
            mine = copy.deepcopy((running, waiting))
            want = reference_schedule(*mine, free, bs, max_seqs, budget)
            theirs = copy.deepcopy((running, waiting))
            got = fn(*theirs, free, bs, max_seqs, budget)
            if got is None:
                raise ExerciseFailure("returned None (did you forget `return`?)")
            chunks, preempted, left = got
            args = f"running={_state(running)}, waiting={_state(waiting)}, free_blocks={free}"
            if [tuple(c) for c in chunks] != want[0] or list(preempted) != want[1]:
                raise ExerciseFailure(
                    f"schedule({args}, block_size={bs}, max_num_seqs={max_seqs}, "
                    f"token_budget={budget}):\n    expected chunks {want[0]}, preempted {want[1]};"
                    f"\n    got      chunks {list(chunks)}, preempted {list(preempted)}.\n    Hint: {hint}"
                )
            if (
                left != want[2]
                or _state(theirs[0]) != _state(mine[0])
                or _state(theirs[1]) != _state(mine[1])
            ):
                raise ExerciseFailure(
                    f"schedule({args}): the right chunks, but the bookkeeping differs: expected "
                    f"free_blocks={want[2]}, running={_state(mine[0])}, waiting={_state(mine[1])}; got "
                    f"free_blocks={left}, running={_state(theirs[0])}, waiting={_state(theirs[1])} "
                    "(a preempted sequence gives back its blocks and restarts from 0 computed tokens)"
                )

    return run_check("schedule", student, reference_schedule, test)


# ---- notebook 05: block allocation with a prefix cache -----------------------------------------------
def reference_allocate_blocks(token_ids, block_size, cache, free_blocks, hash_fn=hash):
    """Block table for a new prompt, reusing cached full blocks (labkit/engine/block_manager.py).

    A full block's key is (hash of the key of the block before it, or None for the first; its tokens as
    a tuple); `cache` maps hash_fn(key) -> (block id, key). Look up the prompt's leading full blocks in
    order, never the block holding the last token (its forward pass gives the next token's logits); a
    hit must have the same key (a hash can collide); stop at the first miss. Take the other blocks from
    the front of `free_blocks` and register the new *full* blocks in `cache` (unless their hash is
    taken).
    Returns (block_table, num_cached_tokens)."""
    table, parent, cached = [], None, 0
    num_blocks = -(-len(token_ids) // block_size)
    lookups = (len(token_ids) - 1) // block_size
    for i in range(num_blocks):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        key = (parent, tokens)
        hit = cache.get(hash_fn(key))
        if i == cached // block_size and i < lookups and hit is not None and hit[1] == key:
            table.append(hit[0])
            cached += block_size
        else:
            block = free_blocks.pop(0)
            table.append(block)
            if len(tokens) == block_size and hash_fn(key) not in cache:
                cache[hash_fn(key)] = (block, key)
        parent = hash_fn(key)
    return table, cached


def _weak_hash(key):  # collides on purpose: blocks with the same token sum
    return (key[0] or 0) * 31 + sum(key[1]) % 97


def _allocation_cases():
    """(name, [prompts allocated in turn], hash_fn, what a wrong answer missed)"""
    return [
        (
            "a fresh cache",
            [[1, 2, 3, 4, 5, 6]],
            hash,
            "a new prompt takes ceil(len / block_size) blocks",
        ),
        (
            "a shared prefix",
            [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 9, 9]],
            hash,
            "the second prompt reuses the first two full blocks (and registers only full blocks)",
        ),
        (
            "the same block after a different prefix",
            [[1, 2, 3, 4, 5], [9, 9, 3, 4, 5]],
            hash,
            "a block's key includes the hash of the block before it: the same tokens after another "
            "prefix have other keys and values",
        ),
        (
            "a hash collision",
            [[1, 2, 3, 4, 5], [2, 1, 4, 3, 5]],
            _weak_hash,
            "on a hit, compare the stored key with the block's: same hash, other tokens is a miss",
        ),
        (
            "a prompt that is all cached",
            [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]],
            hash,
            "the block holding the prompt's last token is never taken from the cache",
        ),
        (
            "a miss, then blocks that would hit",
            [[1, 2, 3, 4, 5, 6, 7], [1, 2, 4, 3, 5, 6, 7]],
            _weak_hash,
            "stop looking at the first miss: the blocks after it follow another prefix, even where "
            "their hashes match",
        ),
    ]


def check_allocate_blocks(student, block_size: int = 2):
    def test(fn):
        for name, prompts, hash_fn, hint in _allocation_cases():
            # (prefix cache: hash -> (block id, key), free block ids), one copy per side
            mine: tuple[dict, list[int]] = ({}, list(range(100, 120)))
            theirs: tuple[dict, list[int]] = ({}, list(range(100, 120)))
            for prompt in prompts:
                want = reference_allocate_blocks(prompt, block_size, *mine, hash_fn)
                got = fn(list(prompt), block_size, *theirs, hash_fn)
                if got is None:
                    raise ExerciseFailure("returned None (did you forget `return`?)")
                if (list(got[0]), got[1]) != (want[0], want[1]) or theirs != mine:
                    raise ExerciseFailure(
                        f"{name}: allocating {prompt} (block_size={block_size}) should give block table "
                        f"{want[0]} with {want[1]} cached tokens, leaving {len(mine[0])} cached blocks; "
                        f"got {list(got[0])} with {got[1]}, {len(theirs[0])} cached blocks.\n"
                        f"    Hint: {hint}"
                    )

    return run_check("allocate_blocks", student, reference_allocate_blocks, test)


# ---- notebook 06: how many KV blocks fit -------------------------------------------------------------
def reference_kv_cache_blocks(
    budget_bytes, num_layers, num_kv_heads, head_dim, block_size, bytes_per_element
):
    """Whole blocks of `block_size` tokens (K and V, every layer) that fit in `budget_bytes`."""
    per_block = 2 * num_layers * num_kv_heads * head_dim * block_size * bytes_per_element
    return budget_bytes // per_block


def check_kv_cache_blocks(student):
    def test(fn):
        for args, hint in [
            ((1 << 30, 30, 3, 64, 16, 4), "K and V: two vectors per token, layer and KV head"),
            ((1 << 30, 30, 3, 64, 128, 2), "bytes per element: 2 for bf16/fp16, 4 for float32"),
            ((10_000, 4, 4, 64, 16, 4), "every layer holds its own K and V"),
            ((5 * 49152 + 100, 4, 4, 64, 16, 3), "whole blocks only: round down"),
            (
                (3 << 30, 32, 8, 128, 16, 2),
                "GQA: count KV heads (8 for Llama-3-8B), not query heads",
            ),
        ]:
            want = reference_kv_cache_blocks(*args)
            got = fn(*args)
            if got is None or got != want:
                raise ExerciseFailure(
                    f"kv_cache_blocks{args}: expected {want}, got {got}. Hint: {hint}"
                )

    return run_check("kv_cache_blocks", student, reference_kv_cache_blocks, test)


# ---- notebook 04b ----------------------------------------------------------------------------
def check_accept_greedy(student):
    cases = [
        ([4, 5, 6], [4, 5, 6, 7]),  # every draft right: all of them, plus the model's next token
        ([4, 5, 6], [4, 9, 6, 7]),  # wrong at 1: the later match at 2 must not count
        ([4, 5, 6], [1, 5, 6, 7]),  # wrong at once: a plain decode step
        ([], [3]),  # no draft at all
        ([8, 8], [8, 8, 8]),
    ]

    def test(fn):
        for draft, target in cases:
            got = fn(list(draft), list(target))
            want = reference_accept_greedy(draft, target)
            if got is None:
                raise ExerciseFailure("returned None (did you forget `return`?)")
            if [int(t) for t in got] != want:
                raise ExerciseFailure(
                    f"accept_greedy({draft}, {target}) gave {list(got)}, expected {want}: keep the "
                    "drafts up to the first mismatch, then add the model's own token there"
                )

    return run_check("accept_greedy", student, reference_accept_greedy, test)
