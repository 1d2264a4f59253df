"""Seeded request payloads for load tests."""

import random

from labkit.data import sample_prompts


def workload(
    n: int, seed: int = 0, min_tokens: int = 16, max_tokens: int = 64, model: str = "course"
) -> list[dict]:
    """n seeded completion requests: realistic prompts of mixed length, mixed fixed output lengths
    (ignore_eos, greedy), so the server and the offline engine do exactly the same work."""
    rng = random.Random(seed)
    return [
        {
            "model": model,
            "prompt": p,
            "max_tokens": rng.randint(min_tokens, max_tokens),
            "temperature": 0.0,
            "ignore_eos": True,
        }
        for p in sample_prompts(n, seed)
    ]
