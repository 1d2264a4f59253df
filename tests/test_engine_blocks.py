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
