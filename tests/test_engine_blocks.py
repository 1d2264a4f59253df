"""Block manager and scheduler invariants under random workloads (no model needed: fast)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.engine.block_manager import BlockManager
from labkit.engine.sampling import SamplingParams
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import Sequence, Status

ops = st.lists(
    st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 10**6)),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    num_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    prefix=st.booleans(),
)
def test_no_leak_no_double_use(ops, num_blocks, block_size, budget, max_seqs, prefix):
    """Simulate the engine's bookkeeping (the model replaced by 'every completed chunk yields token 7')."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    live: list[Sequence] = []
    n = 0
    for op, r in ops:
        if op == "add":
            # prompts from a tiny alphabet share prefixes, so the prefix cache gets exercised
            length = 1 + r % (num_blocks * block_size // 2)
            max_tokens = 1 + (r // 7) % 5
            if bm.blocks_needed(length + max_tokens) > num_blocks:
                continue
            seq = Sequence(
                f"r{n}",
                [(r >> i) % 2 for i in range(length)],
                length,
                SamplingParams(max_tokens=max_tokens),
                n,
            )
            n += 1
            sched.add(seq)
            live.append(seq)
        elif op == "abort" and live:
            seq = live.pop(r % len(live))
            sched.finish(seq, "abort")
        else:
            chunks = sched.schedule()
            if sched.has_unfinished():
                assert chunks, "scheduler stalled with work queued"
            assert sum(c.num_tokens for c in chunks) <= budget
            assert len(sched.running) <= max_seqs
            for c in chunks:
                seq = c.seq
                assert seq.status is Status.RUNNING
                assert len(seq.block_table) * block_size >= seq.num_computed_tokens + c.num_tokens
                done = c.completes
                seq.num_computed_tokens += c.num_tokens
                bm.register_full_blocks(seq)
                if done:
                    seq.token_ids.append(7)
                    if seq.num_output_tokens >= seq.params.max_tokens:
                        sched.finish(seq, "length")
                        live.remove(seq)
        bm.check_invariants(sched.running)
        for seq in sched.waiting:
            assert not seq.block_table
        assert bm.num_used == len({b for s in sched.running for b in s.block_table})
    for seq in list(live):
        sched.finish(seq, "abort")
    bm.check_invariants([])
    assert bm.num_free == num_blocks, "blocks leaked"


def test_prefix_sharing_and_eviction():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], 5, SamplingParams(), 0)
    bm.allocate(a)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)  # blocks [1,2] and [3,4] are now named
    b = Sequence("b", [1, 2, 3, 4, 9], 5, SamplingParams(), 1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 4
    assert bm.ref_count[a.block_table[0]] == 2 and bm.num_used == 4
    bm.free_seq(a)
    bm.free_seq(b)
    c = Sequence("c", [1, 2, 3, 4], 4, SamplingParams(), 2)  # freed blocks still serve as cache
    bm.allocate(c)
    assert c.num_computed_tokens == 2  # the last token is always recomputed
    bm.check_invariants([c])
    assert bm.prefix_cache_hit_rate == 3 / 5


def test_sequence_block_helpers():
    seq = Sequence("s", list(range(10)), 10, SamplingParams(), 0, block_size=4)
    assert (seq.num_blocks, seq.num_full_blocks, seq.last_block_num_tokens) == (3, 2, 2)
    assert seq.block(0) == [0, 1, 2, 3] and seq.block(2) == [8, 9]
    seq.token_ids += [10, 11]
    assert (seq.num_blocks, seq.last_block_num_tokens) == (3, 4)


def test_a_prefix_hit_compares_tokens_not_just_a_hash():
    # CPython hashes -1 like -2, so these two one-block prefixes have the same hash()
    assert hash((None, (-1, 5))) == hash((None, (-2, 5)))
    bm = BlockManager(num_blocks=6, block_size=2)
    a = Sequence("a", [-1, 5, 7], 3, SamplingParams(), 0)
    bm.allocate(a)
    a.num_computed_tokens = 3
    bm.register_full_blocks(a)
    assert bm.cached_prefix(Sequence("b", [-1, 5, 9], 3, SamplingParams(), 1)) == a.block_table[:1]
    assert bm.cached_prefix(Sequence("c", [-2, 5, 9], 3, SamplingParams(), 2)) == []


def test_admission_looks_the_prefix_up_once():
    bm = BlockManager(num_blocks=8, block_size=2)
    calls = []
    lookup = bm.cached_prefix
    bm.cached_prefix = lambda seq: calls.append(seq) or lookup(seq)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(Sequence("a", [1, 2, 3, 4, 5], 5, SamplingParams(), 0))
    sched.schedule()
    assert len(calls) == 1


def test_forked_samples_share_blocks_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    parent = Sequence("r", [1, 2, 3, 4, 5], 5, SamplingParams(n=3), 0)
    assert parent.num_slots == 3
    sched.add(parent)
    (chunk,) = sched.schedule()
    parent.num_computed_tokens += chunk.num_tokens
    children = [Sequence("r", [1, 2, 3, 4, 5], 5, parent.params, 0, index=i) for i in (1, 2)]
    for child in children:
        sched.fork(parent, child)
    samples = [parent, *children]
    parent.pending_forks = 0
    assert all(s.block_table == parent.block_table for s in samples)  # same physical blocks
    assert [bm.ref_count[b] for b in parent.block_table] == [3, 3, 3]
    bm.check_invariants(samples)
    shared_tail = parent.block_table[
        2
    ]  # holds token 5 only: the samples write their next token there
    for i, s in enumerate(samples):
        s.token_ids.append(10 + i)
    chunks = sched.schedule()
    assert [c.num_tokens for c in chunks] == [1, 1, 1]
    copies = bm.take_copies()
    assert copies == [
        (shared_tail, parent.block_table[2]),
        (shared_tail, children[0].block_table[2]),
    ]
    assert children[1].block_table[2] == shared_tail  # the last holder writes in place
    assert len({s.block_table[2] for s in samples}) == 3
    assert [bm.ref_count[b] for b in parent.block_table[:2]] == [3, 3]  # full blocks stay shared
    bm.check_invariants(samples)
    for s in samples:
        sched.finish(s, "length")
    bm.check_invariants([])
    assert bm.num_free == 8


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    n=st.integers(1, 3),
    num_blocks=st.integers(7, 16),  # one sequence (9 + 4 tokens) always fits
    budget=st.integers(1, 12),
)
def test_forked_samples_never_leak_under_preemption(lengths, n, num_blocks, budget):
    """Requests for n samples, forking when their prompt is done, through a small cache: preemption,
    copy-on-write and finishing keep the invariants and free every block."""
    bm = BlockManager(num_blocks, block_size=2)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=budget)
    for i, length in enumerate(lengths):
        sched.add(
            Sequence(f"r{i}", list(range(length)), length, SamplingParams(n=n, max_tokens=4), i)
        )
    for _ in range(300):
        if not sched.has_unfinished():
            break
        chunks = sched.schedule()
        assert chunks, "scheduler stalled with work queued"
        bm.take_copies()
        for c in chunks:
            seq = c.seq
            seq.num_computed_tokens += c.num_tokens
            bm.register_full_blocks(seq)
            if not c.completes:
                continue
            for index in range(1, seq.pending_forks + 1):
                child = Sequence(
                    seq.request_id,
                    list(seq.token_ids),
                    seq.num_prompt_tokens,
                    seq.params,
                    seq.arrival,
                    index=index,
                )
                sched.fork(seq, child)
            seq.pending_forks = 0
        for seq in [s for s in sched.running if s.num_computed_tokens == s.num_tokens]:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
        bm.check_invariants(sched.running)
        assert sum(s.num_slots for s in sched.running) <= 3
    assert not sched.has_unfinished()
    assert bm.num_free == num_blocks, "blocks leaked"
