"""labkit.engine.attention: paged decode (embedding_bag, in place) and prefill (gather) attention equal plain
dense attention over each sequence's own keys, with grouped-query heads, scattered blocks and ragged lengths;
and the gather-based reference (attention_reference.py); and the engine on a grouped-query Llama gives the
same greedy tokens as transformers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.engine import LLMEngine, SamplingParams
from labkit.engine.attention import (
    build_decode_batch,
    build_prefill_batch,
    decode_attention,
    prefill_attention,
)
from labkit.engine.attention_reference import paged_attention
from labkit.engine.kv_cache import KVShape, PagedKVCache

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 40


def filled_cache(lengths, seed=0):
    """A cache holding random keys/values for sequences of the given lengths in shuffled blocks; returns the
    cache, the block tables and each sequence's dense [len, kv_heads, dim] keys and values."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(KVShape(1, KV_HEADS, DIM, 512), NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, dense = [], []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // BLOCK))]
        k, v = (
            torch.randn(n, KV_HEADS, DIM, generator=gen),
            torch.randn(n, KV_HEADS, DIM, generator=gen),
        )
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        cache.write(0, cache.write_index(slots), k, v)
        tables.append(table)
        dense.append((k, v))
    return cache, tables, dense


def dense_attention(q, k, v, scale, causal_start=None):
    """q [n_q, heads, dim] against k, v [n_k, kv_heads, dim]; causal if the queries sit at causal_start..."""
    k, v = (
        k.repeat_interleave(HEADS // KV_HEADS, dim=1),
        v.repeat_interleave(HEADS // KV_HEADS, dim=1),
    )
    scores = torch.einsum("qhd,khd->hqk", q * scale, k)
    if causal_start is not None:
        qpos = torch.arange(q.shape[0])[:, None] + causal_start
        scores = scores.masked_fill(torch.arange(k.shape[0])[None] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_cache_write_puts_keys_transposed_within_blocks():
    cache, tables, dense = filled_cache([6])
    k, v = dense[0]
    for p in range(6):
        block, off = tables[0][p // BLOCK], p % BLOCK
        torch.testing.assert_close(cache.k[0][:, block, :, off], k[p])
        torch.testing.assert_close(cache.v[0][:, block * BLOCK + off], v[p])


@pytest.mark.parametrize("lengths", [[1], [4, 5, 1, 13], [16, 3, 9, 8, 12]])
def test_decode_attention_equals_dense_attention(lengths):
    cache, tables, dense = filled_cache(lengths)
    q = torch.randn(len(lengths), HEADS, DIM)
    batch = build_decode_batch(
        list(range(len(lengths))), lengths, tables, HEADS, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, "cpu"
    )
    out = decode_attention(q, cache.k[0], cache.v[0], batch, 0.3)
    for b, (k, v) in enumerate(dense):
        torch.testing.assert_close(
            out[b], dense_attention(q[b : b + 1], k, v, 0.3)[0], rtol=1e-5, atol=1e-5
        )


def test_prefill_attention_equals_causal_dense_attention():
    lengths, starts = [7, 13, 5], [0, 9, 3]  # chunks: the 2nd and 3rd continue earlier chunks
    cache, tables, dense = filled_cache([s + n for s, n in zip(starts, lengths)])
    q = torch.randn(sum(lengths), HEADS, DIM)
    batch = build_prefill_batch(list(range(sum(lengths))), starts, lengths, tables, BLOCK, "cpu")
    out = prefill_attention(q, cache.k[0], cache.v[0], batch, 0.3)
    first = 0
    for (k, v), s, n in zip(dense, starts, lengths):
        ref = dense_attention(q[first : first + n], k, v, 0.3, causal_start=s)
        torch.testing.assert_close(out[first : first + n], ref, rtol=1e-5, atol=1e-5)
        first += n


def test_engine_on_a_grouped_query_llama_equals_transformers():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    prompts = [[5, 17, 42, 7, 99, 3, 250], [8, 1], list(range(20, 45))]
    ref = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                pad_token_id=0,
            )
            ref.append(out[0, len(p) :].tolist())
    # small blocks and a small token budget: chunked prefill runs in the same steps as other sequences' decode
    engine = LLMEngine(model, tokenizer=None, block_size=4, max_num_batched_tokens=9)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    done, mixed_steps = {}, 0
    while engine.has_unfinished_requests():
        chunks = engine.scheduler.running and [
            s.num_tokens - s.num_computed_tokens for s in engine.scheduler.running
        ]
        # a prefill chunk beside decodes
        mixed_steps += bool(chunks) and max(chunks) > 1 and min(chunks) == 1
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert mixed_steps > 0
    assert [done[str(i)] for i in range(len(prompts))] == ref


def test_a_half_precision_cache_under_a_float32_model_gives_the_same_greedy_tokens():
    from labkit import load_model

    model, tok = load_model(device="cpu")
    prompts = ["It is a truth universally acknowledged", "Mr. Darcy"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = LLMEngine(model, tok, kv_cache_dtype=dtype)
        assert engine.cache.k[0].dtype == dtype
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        outs[dtype] = engine.run_to_completion()
    # bfloat16 keys and values round the attention a little; the first tokens of each answer still agree
    assert all(
        outs[torch.bfloat16][k][:4] == outs[torch.float32][k][:4] for k in outs[torch.float32]
    )


@pytest.mark.parametrize("lengths", [[1], [4, 5, 1, 13], [16, 3, 9, 8, 12]])
def test_fast_decode_equals_the_gather_reference(lengths):
    cache, tables, _ = filled_cache(lengths, seed=1)
    q = torch.randn(len(lengths), HEADS, DIM)
    batch = build_decode_batch(
        list(range(len(lengths))), lengths, tables, HEADS, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, "cpu"
    )
    out = decode_attention(q, cache.k[0], cache.v[0], batch, 0.3)
    for b, (n, table) in enumerate(zip(lengths, tables)):
        ref = paged_attention(q[b : b + 1], cache.k[0], cache.v[0], table, n - 1, 0.3)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_fast_prefill_equals_the_gather_reference():
    lengths, starts = [7, 13, 5, 1], [0, 9, 3, 4]
    cache, tables, _ = filled_cache([s + n for s, n in zip(starts, lengths)], seed=2)
    q = torch.randn(sum(lengths), HEADS, DIM)
    batch = build_prefill_batch(list(range(sum(lengths))), starts, lengths, tables, BLOCK, "cpu")
    out = prefill_attention(q, cache.k[0], cache.v[0], batch, 0.3)
    first = 0
    for table, s, n in zip(tables, starts, lengths):
        ref = paged_attention(q[first : first + n], cache.k[0], cache.v[0], table, s, 0.3)
        torch.testing.assert_close(out[first : first + n], ref, rtol=1e-5, atol=1e-5)
        first += n


def test_the_gather_reference_equals_dense_attention():
    lengths = [6, 11]
    cache, tables, dense = filled_cache(lengths, seed=3)
    for n, table, (k, v) in zip(lengths, tables, dense):
        q = torch.randn(n, HEADS, DIM)
        ref = paged_attention(q, cache.k[0], cache.v[0], table, 0, 0.3)
        torch.testing.assert_close(
            ref, dense_attention(q, k, v, 0.3, causal_start=0), rtol=1e-5, atol=1e-5
        )


def test_copy_blocks_copies_keys_and_values_of_every_layer():
    cache = PagedKVCache(KVShape(2, KV_HEADS, DIM, 64), 6, BLOCK, torch.float32, "cpu")
    for t in cache.k + cache.v:
        t.normal_()
    before = [t.clone() for t in cache.k + cache.v]
    cache.copy_blocks([(1, 4), (2, 0)])
    for layer in range(2):
        k, v = cache.k[layer], cache.v[layer]
        torch.testing.assert_close(k[:, 4], before[layer][:, 1])
        torch.testing.assert_close(k[:, 0], before[layer][:, 2])
        torch.testing.assert_close(
            v[:, 4 * BLOCK : 5 * BLOCK], before[2 + layer][:, BLOCK : 2 * BLOCK]
        )
        torch.testing.assert_close(k[:, 3], before[layer][:, 3])  # others untouched
