"""Exercise checks for notebooks 04-06 (see labkit.checks: each returns the student's function if it is
right, else labkit's reference, so the notebook always runs to the end)."""

import torch

from ..checks import ExerciseFailure, expect_close, run_check
from .baselines import generate_no_cache


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
