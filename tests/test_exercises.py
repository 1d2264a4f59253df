import bisect
import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import nbformat
import pytest
import torch

import labkit.checks
import labkit.engine.checks
import labkit.flash_attention_checks
import labkit.lora_checks
import labkit.quant.checks
import labkit.roofline_checks
import labkit.serve.checks
import labkit.structured_checks
from labkit.exercises import STUB, generate, strip_solutions
from labkit.quant import primitives
from labkit.quant.smoothquant import smoothing_scales


def test_solution_block_becomes_an_indented_stub():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    y = x * 2\n    return y\n    ### END SOLUTION\n\nf = check(f)"
    out = strip_solutions(src)
    assert out == f"def f(x):\n    {STUB}\n\nf = check(f)"
    ns = {}
    exec(out.replace("f = check(f)", ""), ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize(
    "bad",
    [
        "### BEGIN SOLUTION\nx",
        "x\n### END SOLUTION",
        "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
    ],
)
def test_unbalanced_markers_are_errors(bad):
    with pytest.raises(ValueError):
        strip_solutions(bad)


def test_student_notebooks_are_up_to_date():
    stale = generate(check=True)
    assert stale == [], f"run `make notebooks` to regenerate: {stale}"


def test_stale_and_orphan_copies_are_detected(tmp_path):
    sol, stu = tmp_path / "solutions", tmp_path / "notebooks"
    sol.mkdir()
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
            )
        ]
    )
    nbformat.write(nb, sol / "01_x.ipynb")
    assert "notebooks/01_x.ipynb" in generate(sol, stu, check=True)
    generate(sol, stu)
    assert generate(sol, stu, check=True) == []
    assert "return 1" not in (stu / "01_x.ipynb").read_text()
    (stu / "99_orphan.ipynb").write_text("{}")
    assert any("orphan" in s for s in generate(sol, stu, check=True))


# ---- every exercise check: accepts the reference, rejects wrong answers, falls back when unsolved ----


@dataclass
class Exercise:
    check: Callable
    reference: Callable
    wrong: list[Callable]  # plausible mistakes, each of which the check must catch
    needs_model: bool = False  # the check also takes (model, prompt_ids): the course model's


def _shifted_greedy(model, prompt_ids, n):  # one token off: the cache fed the prompt twice, say
    return labkit.engine.checks.reference_greedy_with_cache(model, prompt_ids, n + 1)[1:]


def _one_short_greedy(model, prompt_ids, n):
    return labkit.engine.checks.reference_greedy_with_cache(model, prompt_ids, n - 1)


def _gptq_divided_by_u_squared(W, U, quantize):
    W, Q = W.clone(), torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = quantize(W[:, j])
        W[:, j + 1 :] -= ((W[:, j] - Q[:, j]) / U[j, j] ** 2)[:, None] * U[j, j + 1 :][None, :]
    return Q


def _awq_search(x_mean, G, W, quantize, n_grid, unscale=True, use_G=True):
    G = G if use_G else torch.eye(len(G))
    best = (float("inf"), 0.0, None)
    for alpha in [i / n_grid for i in range(n_grid)]:
        s = labkit.quant.checks.reference_awq_scales(x_mean, alpha)
        W_hat = quantize(W * s) / s if unscale else quantize(W * s)
        err = labkit.quant.checks.output_error(W, W_hat, G).item()
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def _awq_search_without_unscaling(x_mean, G, W, quantize, n_grid=20):
    return _awq_search(x_mean, G, W, quantize, n_grid, unscale=False)


def _awq_search_on_weight_error(x_mean, G, W, quantize, n_grid=20):
    return _awq_search(x_mean, G, W, quantize, n_grid, use_G=False)


def _schedule_waiting_first(running, waiting, free, bs, max_seqs, budget):  # admits before decoding
    chunks, preempted, free = _E.reference_schedule(
        [], waiting, free, bs, max_seqs - len(running), budget
    )
    more, pre2, free = _E.reference_schedule(running, [], free, bs, max_seqs, budget)
    return chunks + more, preempted + pre2, free


def _schedule_oldest_victim(running, waiting, free, bs, max_seqs, budget):  # preempts the oldest
    out = _E.reference_schedule(running[::-1], waiting, free, bs, max_seqs, budget)
    running.reverse()
    return out


def _allocate_unverified(tokens, bs, cache, free, hash_fn=hash):  # trusts the hash alone
    table, parent, cached = [], None, 0
    for i in range(-(-len(tokens) // bs)):
        key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
        hit = cache.get(hash_fn(key))
        if i == cached // bs and i < (len(tokens) - 1) // bs and hit is not None:
            table.append(hit[0])
            cached += bs
        else:
            table.append(free.pop(0))
            if len(key[1]) == bs and hash_fn(key) not in cache:
                cache[hash_fn(key)] = (table[-1], key)
        parent = hash_fn(key)
    return table, cached


def _allocate_no_parent(tokens, bs, cache, free, hash_fn=hash):  # a block named by its tokens only
    return _E.reference_allocate_blocks(
        tokens, bs, cache, free, lambda key: hash_fn((None, key[1]))
    )


def _flash_mistake(mistake: str) -> Callable:
    def student(q, k, v, causal=False, block_q=16, block_k=16):
        return labkit.flash_attention.mistaken_flash_attention(
            q, k, v, causal, block_q, block_k, mistake
        )

    return student


_Q, _E, _S = labkit.quant.checks, labkit.engine.checks, labkit.serve.checks
EXERCISES = {
    # notebook 00
    "perplexity_from_nll": Exercise(
        labkit.checks.check_perplexity_from_nll,
        labkit.checks.reference_perplexity_from_nll,
        [lambda nll, n: nll / n],  # forgot the exp
    ),
    # notebooks 01-03
    "quantize_symmetric": Exercise(
        _Q.check_quantize_symmetric,
        primitives.quantize_symmetric,
        [lambda x, b: (torch.round(x), x.abs().max())],
    ),
    "quantize_asymmetric": Exercise(
        _Q.check_quantize_asymmetric,
        primitives.quantize_asymmetric,
        [lambda x, b: primitives.quantize_symmetric(x, b) + (0,)],
    ),
    "fake_quantize_groups": Exercise(
        _Q.check_fake_quantize_groups,
        _Q.reference_fake_quantize_groups,
        [lambda w, b, g: w, lambda w, b, g: _Q.reference_fake_quantize_groups(w, b, w.shape[1])],
    ),
    "int8_linear_dynamic": Exercise(
        _Q.check_int8_linear_dynamic,
        _Q.reference_int8_linear_dynamic,
        [lambda x, wq, s: x @ wq.float().t()],  # forgot the scales
    ),
    "hessian": Exercise(
        _Q.check_hessian,
        _Q.reference_hessian,
        [lambda x: x.t() @ x],  # forgot 2/n
    ),
    "awq_scales": Exercise(
        _Q.check_awq_scales,
        _Q.reference_awq_scales,
        [lambda m, a: m**a],  # not normalised
    ),
    "gptq_columns": Exercise(
        _Q.check_gptq_columns,
        _Q.reference_gptq_columns,
        [
            # RTN: no update of the remaining columns
            lambda W, U, quantize: torch.stack([quantize(W[:, j]) for j in range(W.shape[1])], 1),
            _gptq_divided_by_u_squared,
        ],
    ),
    "awq_search": Exercise(
        _Q.check_awq_search,
        _Q.reference_awq_search,
        [_awq_search_without_unscaling, _awq_search_on_weight_error],
    ),
    # notebook 02b
    "smoothing_scales": Exercise(
        _Q.check_smoothing_scales,
        smoothing_scales,
        [lambda x, w, a: x**a / w**a, lambda x, w, a: x ** (1 - a) / w**a],  # wrong exponents
    ),
    # notebook 03c
    "ste_fake_quantize": Exercise(
        _Q.check_ste_fake_quantize,
        _Q.reference_ste_fake_quantize,
        [
            lambda w, b, g: primitives.fake_quantize(
                w.detach(), b, False, "group", g
            ),  # no gradient
            lambda w, b, g: w,  # no quantization
            # detached w: the gradient is lost
            lambda w, b, g: (
                primitives.fake_quantize(w, b, False, "group", g).detach() * 1.0 + 0 * w
            ),
        ],
    ),
    # notebook 03b
    "token_mask": Exercise(
        labkit.structured_checks.check_token_mask,
        labkit.structured_checks.reference_token_mask,
        [
            # the token alone, not the prefix followed by it
            lambda prefix, vocab, is_prefix, is_complete, eos: torch.tensor(
                [bool(t) and is_prefix(t) for t in vocab]
            ),
            # empty tokens allowed
            lambda prefix, vocab, is_prefix, is_complete, eos: torch.tensor(
                [is_prefix(prefix + t) for t in vocab]
            ),
            # end of sequence never allowed
            lambda prefix, vocab, is_prefix, is_complete, eos: torch.tensor(
                [bool(t) and is_prefix(prefix + t) for t in vocab]
            ),
        ],
    ),
    "decode_tok_s": Exercise(
        labkit.roofline_checks.check_decode_tok_s,
        labkit.roofline_checks.reference_decode_tok_s,
        # forgot the KV cache reads; forgot the compute roof
        [
            lambda w, kv, f, b, bw, rate: b / max(w / bw, b * f / rate),
            lambda w, kv, f, b, bw, rate: b * bw / (w + b * kv),
        ],
    ),
    # notebooks 04-05
    "kv_cache_bytes": Exercise(
        _E.check_kv_cache_bytes,
        _E.reference_kv_cache_bytes,
        [
            lambda layers, heads, dim, tokens, nbytes: layers * heads * dim * tokens * nbytes
        ],  # K only
    ),
    "greedy_with_cache": Exercise(
        _E.check_greedy_with_cache,
        _E.reference_greedy_with_cache,
        [_shifted_greedy, _one_short_greedy],
        needs_model=True,
    ),
    "slot_for": Exercise(
        _E.check_slot_for,
        _E.reference_slot_for,
        [lambda table, pos, bs: table[pos // bs] + pos % bs],  # forgot * block_size
    ),
    "static_batch_work": Exercise(
        _E.check_static_batch_work,
        _E.reference_static_batch_work,
        [lambda lengths, bs: sum(lengths)],  # that is continuous batching's work
    ),
    "schedule": Exercise(
        _E.check_schedule,
        _E.reference_schedule,
        [_schedule_waiting_first, _schedule_oldest_victim],
    ),
    "allocate_blocks": Exercise(
        _E.check_allocate_blocks,
        _E.reference_allocate_blocks,
        [_allocate_no_parent, _allocate_unverified],
    ),
    # notebook 04c
    "flash_attention": Exercise(
        labkit.flash_attention_checks.check_flash_attention,
        labkit.flash_attention.reference_flash_attention,
        [_flash_mistake(mistake) for mistake in labkit.flash_attention.MISTAKES],
    ),
    "combine_splits": Exercise(
        labkit.flash_attention_checks.check_combine_splits,
        labkit.flash_attention_checks.reference_combine_splits,
        [
            lambda o, m, denom: o.mean(dim=0),  # every chunk weighed the same
            lambda o, m, denom: (
                (denom[..., None] * o).sum(0) / denom.sum(0)[..., None]
            ),  # each denom against its own max
        ],
    ),
    # notebook 04b
    "accept_greedy": Exercise(
        _E.check_accept_greedy,
        _E.reference_accept_greedy,
        [
            lambda draft, target: [d for d, t in zip(draft, target) if d == t],  # no own token
            lambda draft, target: [d for d, t in zip(draft, target) if d == t] + [target[-1]],
        ],
    ),
    # notebook 06
    "kv_cache_blocks": Exercise(
        _E.check_kv_cache_blocks,
        _E.reference_kv_cache_blocks,
        [
            lambda mem, layers, heads, dim, bs, nbytes: mem // (layers * heads * dim * bs * nbytes),
            lambda mem, layers, heads, dim, bs, nbytes: (
                -(-mem // (2 * layers * heads * dim * bs * nbytes))
            ),
        ],  # K only; rounded up
    ),
    # notebooks 07-09
    "parse_sse": Exercise(
        _S.check_parse_sse,
        _S.reference_parse_sse,
        [lambda lines: ("".join(lines), None)],
    ),
    "latency_summary": Exercise(
        _S.check_latency_summary,
        _S.reference_latency_summary,
        # TPOT over every token, the first one's wait included
        [
            lambda sent, t: {
                "ttft": t[0] - sent,
                "tpot": (t[-1] - sent) / len(t),
                "e2e": t[-1] - sent,
            }
        ],
    ),
    "poisson_arrivals": Exercise(
        _S.check_poisson_arrivals,
        _S.poisson_arrivals,
        [
            lambda rate, n, seed=0: [(i + 1) / rate for i in range(n)],  # evenly spaced
            lambda rate, n, seed=0: [random.Random(seed).expovariate(1 / rate) for _ in range(n)],
        ],  # the gaps, not the times, and the mean taken for the rate
    ),
    "histogram_quantile": Exercise(
        _S.check_histogram_quantile,
        _S.reference_histogram_quantile,
        # the bucket's upper bound, without interpolating inside it
        [lambda q, buckets: next(le for le, c in buckets if c >= q * buckets[-1][1])],
    ),
    "ring_lookup": Exercise(
        _S.check_ring_lookup,
        _S.reference_ring_lookup,
        [
            lambda ring, p: ring[min(bisect.bisect_left([q for q, _ in ring], p), len(ring) - 1)][
                1
            ],
            lambda ring, p: ring[bisect.bisect_right([q for q, _ in ring], p) % len(ring)][1],
            lambda ring, p: ring[p % len(ring)][1],
        ],  # no wrap-around; a point on a server's own point goes to the next; a modulo hash
    ),
    "cost_per_1k_tokens": Exercise(
        _S.check_cost_per_1k_tokens,
        _S.reference_cost_per_1k_tokens,
        [lambda price, tps, util=1.0: price / (tps * 3600) * 1000],  # ignored utilisation
    ),
    # notebook 08c
    "retry_after": Exercise(
        _S.check_retry_after,
        _S.reference_retry_after,
        [
            lambda level, per_minute, cost: max(0, math.ceil((cost - level) / per_minute)),  # /min
            lambda level, per_minute, cost: max(
                0.0, (cost - level) / (per_minute / 60)
            ),  # unrounded
            lambda level, per_minute, cost: round(max(0, cost - level) / (per_minute / 60)),
        ],
    ),
    # notebook 08d
    "batched_lora_delta": Exercise(
        labkit.lora_checks.check_batched_lora_delta,
        labkit.lora_checks.reference_batched_lora_delta,
        [
            lambda x, a, b, slots: x @ a[0].T @ b[0].T,  # every token through the first adapter
            lambda x, a, b, slots: torch.einsum("ti,sri,sor->to", x, a, b),  # every adapter summed
            lambda x, a, b, slots: torch.bmm(a[slots], x[:, :, None])[:, :, 0] @ b[0].T,  # A only
        ],
    ),
}


def test_every_check_function_is_in_the_registry():
    modules = [
        labkit.checks,
        labkit.quant.checks,
        labkit.engine.checks,
        labkit.serve.checks,
        labkit.roofline_checks,
        labkit.structured_checks,
        labkit.flash_attention_checks,
        labkit.lora_checks,
    ]
    defined = {
        fn
        for module in modules
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if name.startswith("check_") and fn.__module__ == module.__name__
    }
    registered = {exercise.check for exercise in EXERCISES.values()}
    missing = sorted(fn.__qualname__ for fn in defined - registered)
    assert not missing, f"add these checks to EXERCISES in {__file__}: {missing}"


@pytest.fixture(scope="module")
def greedy_args(course):
    model, tokenizer = course
    return model, tokenizer("It is a truth universally acknowledged")["input_ids"], 8  # 8 tokens


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_check_accepts_the_reference_and_rejects_wrong_answers(name, capsys, request):
    exercise = EXERCISES[name]
    extra = request.getfixturevalue("greedy_args") if exercise.needs_model else ()

    def check(student):
        return exercise.check(student, *extra)

    assert check(exercise.reference) is exercise.reference
    assert "[ok]" in capsys.readouterr().out
    for wrong in exercise.wrong:
        assert check(wrong) is exercise.reference, f"{name}: a wrong answer was accepted"
        assert "[x]" in capsys.readouterr().out

    def unsolved(*args):
        raise NotImplementedError

    assert check(unsolved) is exercise.reference
    assert "not solved yet" in capsys.readouterr().out


def test_gptq_columns_reference_is_labkits_gptq():
    """The exercise's one-column-at-a-time loop gives labkit's lazy-block GPTQ (per-channel grid)."""
    W, U, _, _ = labkit.quant.checks._gptq_problem()
    X = torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    H = 2 * X.t() @ X / len(X)
    qw, _ = labkit.quant.gptq_quantize_weight(W, H, 4, granularity="channel", block_size=8)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(32)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    rtn = primitives.quantize_weight(W, 4, True, "channel")
    scale, zero = rtn.scale[:, 0], rtn.zero[:, 0]

    def quantize(col):
        return (torch.clamp(torch.round(col / scale) + zero, 0, 15) - zero) * scale

    ours = labkit.quant.checks.reference_gptq_columns(W, U, quantize)
    assert torch.allclose(ours, qw.dequantize(), atol=1e-4)
    assert not torch.allclose(ours, rtn.dequantize(), atol=1e-4)  # and GPTQ did move something


def test_awq_search_reference_is_labkits_search_scale():
    from labkit.quant.awq import search_scale

    x_mean, G, W, quantize = labkit.quant.checks._awq_problem()
    alpha, s = labkit.quant.checks.reference_awq_search(x_mean, G, W, quantize, 20)
    qargs = dict(bits=3, symmetric=False, granularity="group", group_size=16)
    s_lab, alpha_lab = search_scale(x_mean, G, [W], qargs, 20)
    assert alpha == alpha_lab and alpha > 0
    assert torch.allclose(s, s_lab, atol=1e-5)


@pytest.mark.parametrize("case", range(len(_E._schedule_cases())))
def test_schedule_exercise_mirrors_the_engines_scheduler(case):
    """The notebook's plain-data scheduler step makes the same decisions as labkit's Scheduler."""
    from labkit.engine import SamplingParams
    from labkit.engine.block_manager import BlockManager
    from labkit.engine.scheduler import Scheduler
    from labkit.engine.sequence import Sequence, Status

    running, waiting, free, bs, max_seqs, budget, _ = _E._schedule_cases()[case]
    held = sum(s.num_blocks for s in running)
    bm = BlockManager(free + held, bs, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    for i, s in enumerate(running + waiting):
        seq = Sequence(s.name, list(range(s.num_tokens)), s.num_tokens, SamplingParams(), i)
        if s in running:
            seq.block_table = [bm._take_free_block() for _ in range(s.num_blocks)]
            seq.num_computed_tokens, seq.status = s.num_computed, Status.RUNNING
            sched.running.append(seq)
        else:
            sched.add(seq)
    chunks = sched.schedule()
    want_chunks, _, want_free = _E.reference_schedule(running, waiting, free, bs, max_seqs, budget)
    assert [(c.seq.request_id, c.num_tokens) for c in chunks] == want_chunks
    assert bm.num_free == want_free
    assert [s.request_id for s in sched.running] == [s.name for s in running]
    assert [s.request_id for s in sched.waiting] == [s.name for s in waiting]
