"""labkit.engine.compiled_decode: the compiled decode step computes what the eager runner computes, at every
batch size, float32, bfloat16, int8 and int4 (the batch-1 graph streams float and 8-bit weights through
Inductor's reductions, labkit/matvec.py); padded rows never touch a sequence's KV; warm graphs never recompile; and the
engine's tokens are the same with compilation on and off (course model, so each graph compiles in seconds)."""

import copy

import pytest
import torch

from labkit import load_model
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.attention import (
    decode_attention,
    padded_decode_attention,
    streamed_decode_attention,
)
from labkit.engine.compiled_decode import capture_sizes
from labkit.engine.kv_cache import KVShape, PagedKVCache
from labkit.quant import pack_model, rtn_quantize_model

PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy said",
    "The weather at Longbourn was",
    "Emma Woodhouse, handsome, clever, and rich,",
]


@pytest.fixture(scope="module")
def model_tok():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def int4_model(model_tok):
    model = copy.deepcopy(model_tok[0])
    results = rtn_quantize_model(model, 4, 64, "group", symmetric=False, include_head=True)
    return pack_model(model, results)


@pytest.fixture(scope="module")
def variants(model_tok, int4_model):
    """The model in each precision the compiled step has a distinct one-row path for."""
    int8 = copy.deepcopy(model_tok[0])
    results = rtn_quantize_model(int8, 8, granularity="channel", symmetric=False, include_head=True)
    return {
        "float32": model_tok[0],
        "bfloat16": copy.deepcopy(model_tok[0]).to(torch.bfloat16),
        "int8": pack_model(int8, results),
        "int4": int4_model,
    }


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(44) == [1, 2, 4, 8, 16, 24, 32, 40, 44]


def test_enforce_eager_and_compile_after_steps_are_validated():
    with pytest.raises(ValueError, match="enforce_eager must be True or False"):
        EngineConfig(enforce_eager="yes")
    with pytest.raises(ValueError, match="compile_after_steps"):
        EngineConfig(compile_after_steps=-1)


def test_nothing_compiles_until_warm_up_and_enforce_eager_never_compiles(model_tok):
    """An engine that lives for a test or a notebook cell starts in milliseconds and stays eager; warm_up
    is what compiles (and with enforce_eager there is nothing to compile)."""
    engine = LLMEngine(*model_tok, max_num_seqs=2)
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=70))
    engine.run_to_completion()
    assert engine.runner.compiled.compile_seconds == {}
    assert engine.runner.compiled.eager_steps[1] == 69  # every decode step ran eagerly
    eager = LLMEngine(*model_tok, max_num_seqs=2, enforce_eager=True)
    assert eager.runner.compiled is None and eager.warm_up() == {}


def test_padded_decode_attention_equals_the_ragged_kernel():
    """The static-shape attention of the compiled step against decode_attention, with rows of different
    lengths, a table wider than some rows need and a padding row pointing at a spare block."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block, num_blocks = 4, 2, 8, 4, 12
    cache = PagedKVCache(KVShape(1, kv_heads, dim, 64), num_blocks, block, torch.float32, "cpu")
    cache.k[0].normal_()
    cache.v[0].normal_()
    lengths, tables = [5, 1, 11], [[3, 7], [2], [0, 9, 4]]
    q = torch.randn(3, heads, dim)
    from labkit.engine.attention import build_decode_batch

    batch = build_decode_batch(
        [0, 1, 2], lengths, tables, heads, kv_heads, num_blocks, block, dim, "cpu"
    )
    expected = decode_attention(q, cache.k[0], cache.v[0], batch, 0.3)
    padded = torch.tensor([[3, 7, 11], [2, 11, 11], [0, 9, 4], [11, 11, 11]])
    q_padded = torch.cat([q, torch.randn(1, heads, dim)])
    out = padded_decode_attention(
        q_padded, cache.k[0], cache.v[0], padded, torch.tensor(lengths + [1]), 0.3
    )
    torch.testing.assert_close(out[:3], expected, rtol=1e-5, atol=1e-5)


def test_streamed_decode_attention_equals_the_padded_form():
    """The batch-1 graph's attention (multiplies and sums that read the cache through the table) against
    padded_decode_attention, on rows of different lengths sharing one padded table width."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block, num_blocks = 6, 2, 8, 4, 12
    cache = PagedKVCache(KVShape(1, kv_heads, dim, 64), num_blocks, block, torch.float32, "cpu")
    cache.k[0].normal_()
    cache.v[0].normal_()
    tables = torch.tensor([[3, 7, 11], [2, 11, 11], [0, 9, 4]])
    lengths = torch.tensor([5, 1, 11])
    q = torch.randn(3, heads, dim)
    expected = padded_decode_attention(q, cache.k[0], cache.v[0], tables, lengths, 0.3)
    out = streamed_decode_attention(q, cache.k[0], cache.v[0], tables, lengths, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def prefilled_engine(model, tok, batch: int, **options):
    engine = LLMEngine(model, tok, max_num_seqs=4, compile_after_steps=0, **options)
    for i in range(batch):
        engine.add_request(str(i), PROMPTS[i], SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefill (eager)
    return engine


# logits tolerance, relative to the largest logit: float32 sums in another order; bfloat16 rounds each
# product's inputs; int8 and int4's eager kernels run in bfloat16 (the one-row int8 reduction in float32)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "int8": 2e-2, "int4": 2e-2}


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_compiled_logits_equal_eager_at_every_size(model_tok, variants, precision):
    """Batches of 1 to 4: on a CPU, batch 1 runs its own graph and 2 to 4 the one graph whose batch is
    dynamic (compiled once, at batch 2). Their logits match the eager runner's on the same step, within
    float rounding (the kernels fuse and reorder differently)."""
    model = variants[precision]
    tol = TOLERANCE[precision]
    for batch in (1, 2, 3, 4):
        engine = prefilled_engine(model, model_tok[1], batch)
        runner = engine.runner
        step = runner.prepare(engine.scheduler.schedule())
        assert step.plain_decode and runner.compiled.takes(step)
        eager = runner.forward(step)
        compiled = runner.compiled.run(step)
        assert compiled.shape == eager.shape == (batch, model.config.vocab_size)
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol * eager.abs().max().item())
        assert runner.compiled.size_for(batch) in runner.compiled.compile_seconds
        assert runner.compiled.size_for(batch) == (1 if batch == 1 else 4)


def test_padding_rows_never_touch_a_sequences_kv(model_tok):
    """Three sequences padded to 4 rows (what a CUDA graph of size 4 runs, and warm-up's rows): the cache
    changes only at the three real rows' slots (and in the padding block, which no sequence is given);
    the real rows' logits are the unpadded step's; the block manager's invariants hold."""
    engine = prefilled_engine(*model_tok, batch=3)
    runner, bs = engine.runner, engine.block_size
    step = runner.prepare(engine.scheduler.schedule())
    before = [(k.clone(), v.clone()) for k, v in zip(runner.cache.k, runner.cache.v)]
    with torch.inference_mode():
        padded = runner.compiled.call(4, runner.compiled.inputs(step, 4))
    assert padded.shape[0] == 4
    torch.testing.assert_close(padded[:3], runner.forward(step), rtol=1e-4, atol=1e-3)
    pad = runner.compiled.padding_block
    assert pad == engine.block_manager.num_blocks  # the block beyond the manager's
    written = set(step.slots)
    for (k0, v0), k1, v1 in zip(before, runner.cache.k, runner.cache.v):
        for slot in range(pad * bs):  # every slot a sequence could own
            changed = not torch.equal(
                k0[:, slot // bs, :, slot % bs], k1[:, slot // bs, :, slot % bs]
            )
            changed |= not torch.equal(v0[:, slot], v1[:, slot])
            assert changed == (slot in written), slot
    engine.block_manager.check_invariants(engine.scheduler.running)


def run_all(engine, n: int = 1, logprobs: int | None = None) -> dict:
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(
            temperature=0 if n == 1 else 0.8, max_tokens=40, n=n, seed=i, logprobs=logprobs
        )
        engine.add_request(str(i), prompt, params)
    outs: dict = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = outs.setdefault((out.request_id, out.index), {"tokens": [], "logprobs": []})
            entry["tokens"] += out.new_token_ids
            entry["logprobs"] += [lp.logprob for lp in out.logprobs or []]
    return outs


def test_engine_tokens_are_the_same_compiled_and_eager(model_tok):
    """Greedy tokens (40 of them: contexts grow over several blocks, so the table width changes under one
    graph), seeded samples with n=2, and their logprobs, compiled vs eager."""
    model, tok = model_tok
    eager = run_all(LLMEngine(model, tok, max_num_seqs=4, enforce_eager=True), logprobs=1)
    compiled_engine = LLMEngine(model, tok, max_num_seqs=4, compile_after_steps=0)
    compiled = run_all(compiled_engine, logprobs=1)
    assert {k: v["tokens"] for k, v in compiled.items()} == {
        k: v["tokens"] for k, v in eager.items()
    }
    for key in eager:
        torch.testing.assert_close(
            torch.tensor(compiled[key]["logprobs"]),
            torch.tensor(eager[key]["logprobs"]),
            atol=1e-3,
            rtol=0,
        )
    assert compiled_engine.runner.compiled.compile_seconds  # the decode steps did run compiled
    forks_eager = run_all(LLMEngine(model, tok, max_num_seqs=8, enforce_eager=True), n=2)
    forks = run_all(LLMEngine(model, tok, max_num_seqs=8, compile_after_steps=0), n=2)
    assert {k: v["tokens"] for k, v in forks.items()} == {
        k: v["tokens"] for k, v in forks_eager.items()
    }


def test_after_warm_up_mixed_batch_sizes_never_recompile(model_tok):
    """warm_up compiles every graph (on a CPU: batch 1, and the dynamic batch); a workload whose batch
    shrinks from 4 to 1 as requests finish (and whose contexts cross block boundaries) then runs under
    fail_on_recompile. Given batch sizes, it compiles only the graphs that run them."""
    engine = LLMEngine(*model_tok, max_num_seqs=4)
    assert sorted(engine.warm_up([2, 3])) == [4]
    with pytest.raises(ValueError, match="max_num_seqs=4"):
        engine.warm_up([5])
    seconds = engine.warm_up()
    assert sorted(seconds) == [1, 4]
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=10 + 8 * i))
    with torch.compiler.set_stance("fail_on_recompile"):
        engine.run_to_completion()
    assert sorted(engine.runner.compiled.compile_seconds) == [1, 4]


def test_two_engines_with_different_weights_keep_their_own_graphs(model_tok):
    """Guards are dropped (compiled_decode.py): each engine's graphs must still use its own weights."""
    model, tok = model_tok
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    logits = []
    for m in (model, other, model):
        engine = prefilled_engine(m, tok, batch=2)
        step = engine.runner.prepare(engine.scheduler.schedule())
        eager = engine.runner.forward(step)
        compiled = engine.runner.compiled.run(step)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-3)
        logits.append(compiled)
    assert not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(logits[0], logits[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (.ci/gpu runs it)")
def test_cuda_graph_step_equals_eager_at_every_size():
    """On CUDA the compiled step is captured as CUDA graphs (mode reduce-overhead): batches of 1, 2 and 3
    (padded to 4) match the eager runner, and the greedy tokens of an engine run are the same."""
    model, tok = load_model(device="cuda")
    for batch in (1, 2, 3):
        engine = prefilled_engine(model, tok, batch)
        step = engine.runner.prepare(engine.scheduler.schedule())
        eager = engine.runner.forward(step)
        compiled = engine.runner.compiled.run(step)
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())
    eager_tokens = run_all(LLMEngine(model, tok, max_num_seqs=4, enforce_eager=True))
    compiled_tokens = run_all(LLMEngine(model, tok, max_num_seqs=4, compile_after_steps=0))
    assert {k: v["tokens"] for k, v in compiled_tokens.items()} == {
        k: v["tokens"] for k, v in eager_tokens.items()
    }
