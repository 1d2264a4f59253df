"""labkit.engine.kv_quant: the 8-bit KV cache (int8, fp8 e4m3; a scale per token and head) round-trips
within its format's error; attention over it equals attention over its dequantized values (prefill, the
padded decode kernel); the budget counts its real bytes; and the engine with it keeps prefix caching,
preemption, speculative decoding, n > 1 samples and the compiled decode step working (course model)."""

import pytest
import torch

from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.attention import (
    build_decode_batch,
    build_padded_decode_batch,
    build_prefill_batch,
    decode_attention,
    padded_decode_attention,
    prefill_attention,
)
from labkit.engine.kv_cache import KVShape, PagedKVCache, default_num_blocks
from labkit.engine.kv_quant import (
    FORMATS,
    QuantizedKVCache,
    bytes_per_token,
    dequantize,
    quantize,
)

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 24
SHAPE = KVShape(1, KV_HEADS, DIM, 512)


def keys_with_outliers(n: int, seed: int = 0) -> torch.Tensor:
    """[n, kv_heads, dim] keys with two large channels, as real keys have (KIVI)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, KV_HEADS, DIM, generator=gen)
    x[..., 3] *= 20
    x[..., 11] *= -8
    return x


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_is_within_the_formats_error(name):
    fmt = FORMATS[name]
    x = keys_with_outliers(64)
    codes, scale = quantize(x, fmt)
    assert codes.dtype == fmt.dtype and scale.shape == x.shape[:-1]
    err = (dequantize(codes, scale, torch.float32) - x).abs()
    step = scale[..., None]
    if fmt.integer:  # uniform steps: at most half a step
        assert (err <= step / 2 * (1 + 1e-6)).all()
    else:  # e4m3: 3 mantissa bits (relative 2^-4), subnormal steps of 2^-9 near zero
        assert (err <= x.abs() * 2**-4 + step * 2**-9).all()
    # the largest element of each vector is exactly representable: max|x| maps to the largest code
    assert torch.allclose(dequantize(codes, scale, torch.float32).abs().amax(-1), x.abs().amax(-1))
    zeros, zero_scale = quantize(torch.zeros(3, DIM), fmt)
    assert (dequantize(zeros, zero_scale, torch.float32) == 0).all()


def test_kv_cache_dtype_is_validated_with_the_valid_values_listed():
    with pytest.raises(ValueError, match=r"\['auto', 'int8', 'fp8_e4m3'\]"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="int8"):
        EngineConfig(kv_cache_dtype=torch.int8)
    assert EngineConfig().kv_cache_dtype == "auto"
    assert EngineConfig(kv_cache_dtype=torch.bfloat16).kv_cache_dtype == torch.bfloat16


def filled_caches(name: str, lengths: list[int], seed: int = 0):
    """A quantized cache and a float cache holding its dequantized values, in the same shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    quantized = QuantizedKVCache(SHAPE, NUM_BLOCKS, BLOCK, FORMATS[name], "cpu")
    dense = PagedKVCache(SHAPE, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // BLOCK))]
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        k, v = keys_with_outliers(n, seed + n), torch.randn(n, KV_HEADS, DIM, generator=gen)
        quantized.write(0, quantized.write_index(slots), k, v)
        k_codes, k_scale = quantize(k, quantized.format)
        v_codes, v_scale = quantize(v, quantized.format)
        dense.write(
            0,
            dense.write_index(slots),
            dequantize(k_codes, k_scale, torch.float32),
            dequantize(v_codes, v_scale, torch.float32),
        )
        tables.append(table)
    return quantized, dense, tables


@pytest.mark.parametrize("name", list(FORMATS))
def test_attention_over_the_quantized_cache_equals_attention_over_its_dequantized_values(name):
    lengths = [5, 1, 13, 8]
    quantized, dense, tables = filled_caches(name, lengths)
    q = torch.randn(len(lengths), HEADS, DIM)
    index = list(range(len(lengths)))
    ragged = build_decode_batch(
        index, lengths, tables, HEADS, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, "cpu"
    )
    expected = decode_attention(q, dense.k[0], dense.v[0], ragged, 0.3)
    padded = build_padded_decode_batch(index, lengths, tables, BLOCK, "cpu")
    out = padded_decode_attention(
        q,
        quantized.k[0],
        quantized.v[0],
        padded.tables,
        padded.context_lens,
        0.3,
        *quantized.scales(0),
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    starts = [0, 0, 6, 3]  # two prompts, two later chunks
    chunk = [n - s for n, s in zip(lengths, starts)]
    q = torch.randn(sum(chunk), HEADS, DIM)
    batch = build_prefill_batch(list(range(sum(chunk))), starts, chunk, tables, BLOCK, "cpu")
    expected = prefill_attention(q, dense.k[0], dense.v[0], batch, 0.3)
    out = prefill_attention(q, quantized.k[0], quantized.v[0], batch, 0.3, *quantized.scales(0))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_copy_on_write_copies_the_scales_too():
    quantized, _, tables = filled_caches("int8", [4])
    src, dst = tables[0][0], next(b for b in range(NUM_BLOCKS) if b != tables[0][0])
    quantized.copy_blocks([(src, dst)])
    assert torch.equal(quantized.k[0][:, dst], quantized.k[0][:, src])
    for scale in (quantized.k_scale[0], quantized.v_scale[0]):
        per_block = scale.view(KV_HEADS, NUM_BLOCKS, BLOCK)
        assert torch.equal(per_block[:, dst], per_block[:, src])


def test_the_budget_counts_real_bytes_scales_included():
    shape = KVShape(30, 3, 64, 2048)  # SmolLM2-135M
    fp32 = bytes_per_token(shape, "auto", torch.float32)
    assert fp32 == 2 * 30 * 3 * 64 * 4
    assert bytes_per_token(shape, torch.bfloat16, torch.float32) == fp32 // 2
    for name in FORMATS:
        per_token = bytes_per_token(shape, name, torch.float32)
        assert per_token == 2 * 30 * 3 * (64 + 4)  # 64 one-byte codes and a float32 scale per head
        cache = QuantizedKVCache(shape, 10, 16, FORMATS[name], "cpu")
        assert cache.nbytes == per_token * 10 * 16
    budget = 64 << 20
    blocks = {
        dtype: default_num_blocks(
            shape,
            bytes_per_token(shape, dtype, torch.float32),
            16,
            10**6,
            torch.device("cpu"),
            0.5,
            budget,
        )
        for dtype in ("auto", "int8")
    }
    assert blocks["int8"] / blocks["auto"] >= 0.9 * 4  # 4 bytes -> 1 byte, the scales cost 6%


# ---- the engine on the course model ---------------------------------------------------------------------
# `course`: the shipped course model and tokenizer (tests/conftest.py)
PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy said",
    "The weather at Longbourn was",
    "Emma Woodhouse, handsome, clever, and rich,",
]


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, list]:
    """Step to completion, checking the block invariants after every step; request id -> each sample's tokens."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, dict[int, list[int]]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, {}).setdefault(out.index, []).extend(
                out.new_token_ids
            )
        live = [s for samples in engine.requests.values() for s in samples]
        engine.block_manager.check_invariants(live)
    assert engine.block_manager.num_used == 0
    return {rid: [t for _, t in sorted(samples.items())] for rid, samples in tokens.items()}


def greedy(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **options)


@pytest.mark.slow  # engine runs
@pytest.mark.parametrize("name, agree", [("int8", 8), ("fp8_e4m3", 2)])
def test_the_engine_stores_8_bit_codes_and_mostly_agrees_with_the_float_cache(course, name, agree):
    requests = {str(i): (p, greedy(16)) for i, p in enumerate(PROMPTS)}
    reference = run(LLMEngine(*course, enforce_eager=True), requests)
    engine = LLMEngine(*course, enforce_eager=True, kv_cache_dtype=name)
    assert engine.cache.k[0].dtype == FORMATS[name].dtype
    quantized = run(engine, requests)
    # 8-bit keys and values round the attention a little: the first tokens of each answer agree (int8's
    # half-step error is smaller than e4m3's 3-bit mantissa, and agrees for longer)
    assert all(quantized[r][0][:agree] == reference[r][0][:agree] for r in requests)


@pytest.mark.slow  # engine runs
def test_prefix_caching_preemption_and_n_samples_keep_their_tokens(course):
    shared = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    )
    requests = {str(i): (shared + end, greedy(24)) for i, end in enumerate([",", " must", " is"])}
    options = dict(enforce_eager=True, kv_cache_dtype="int8", block_size=4)
    roomy = LLMEngine(*course, enable_prefix_caching=False, **options)
    plain = run(roomy, requests)
    cached = LLMEngine(*course, **options)
    run(cached, {"warm": (shared + ".", greedy(1))})
    assert run(cached, requests) == plain
    assert cached.stats().prefix_cache_hit_rate > 0.5
    tight = LLMEngine(*course, num_blocks=20, enable_prefix_caching=False, **options)
    assert run(tight, requests) == plain
    assert tight.stats().num_preemptions > 0
    # n greedy samples fork the prompt's blocks, then copy-on-write the shared last block (scales too):
    # every sample must equal the single greedy answer
    forked = run(LLMEngine(*course, **options), {"n": (shared + " must", greedy(24, n=3))})
    assert forked["n"] == [plain["1"][0]] * 3


@pytest.mark.slow  # engine runs
def test_speculative_decoding_over_the_quantized_cache_keeps_the_greedy_tokens(course):
    prompt = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. It is a truth universally acknowledged, that"
    )
    requests = {"r": (prompt, greedy(32))}
    options = dict(enforce_eager=True, kv_cache_dtype="int8", block_size=4)
    plain = run(LLMEngine(*course, **options), requests)
    engine = LLMEngine(*course, speculative_ngram=3, **options)
    assert run(engine, requests) == plain
    assert engine.stats().num_accepted_tokens > 0


@pytest.mark.slow
def test_the_compiled_decode_step_reads_the_quantized_cache(course):
    """The compiled step quantizes its writes and dequantizes its gathered blocks inside the graph: its
    logits equal the eager runner's on the same step, and the tokens of a whole run agree."""
    engine = LLMEngine(*course, max_num_seqs=2, compile_after_steps=0, kv_cache_dtype="int8")
    for i in range(2):
        engine.add_request(str(i), PROMPTS[i], greedy(8))
    engine.step()  # the prefill (eager)
    runner = engine.runner
    step = runner.prepare(engine.scheduler.schedule())
    assert step.plain_decode and runner.compiled.takes(step)
    eager = runner.forward(step)
    compiled = runner.compiled.run(step)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
    requests = {str(i): (p, greedy(12)) for i, p in enumerate(PROMPTS[:2])}
    eager_tokens = run(LLMEngine(*course, enforce_eager=True, kv_cache_dtype="int8"), requests)
    compiled_engine = LLMEngine(
        *course, max_num_seqs=2, compile_after_steps=0, kv_cache_dtype="int8"
    )
    assert run(compiled_engine, requests) == eager_tokens
    assert compiled_engine.runner.compiled.compile_seconds


@pytest.mark.slow
def test_quality_measures_through_the_engine_agree_with_the_model(course):
    """kv_quality scores through the engine: on the float cache its multiple choice equals labkit.quality's
    (the model's own forward pass), and a cache compared with itself has KL 0 and the same perplexity."""
    from labkit.evalset import MC_FILE, load_items
    from labkit.kv_quality import multiple_choice, score_windows
    from labkit.quality import multiple_choice as reference_multiple_choice

    items = load_items(MC_FILE)[:6]
    assert multiple_choice(*course, "auto", items) == reference_multiple_choice(*course, items)
    window = list(range(5, 200))
    same = score_windows(*course, [window], [torch.float32], context=150)[str(torch.float32)]
    assert same["scored_tokens"] == 45 and same["kl_per_token"] < 1e-9
    assert same["perplexity"] == pytest.approx(same["perplexity_reference"], rel=1e-6)
    assert same["top1_agreement"] == 1.0
