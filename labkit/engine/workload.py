"""The seeded workloads the engines run in the notebooks and benchmarks, and how they are timed.

Real traffic is *mixed*: most answers are short, a few are long. That spread is exactly what static
batching handles badly (a batch lasts as long as its longest member) and continuous batching handles well.
All requests are greedy with `ignore_eos=True`, so every engine does exactly the same work.
"""

import statistics
import time

import torch

from ..corpus import split_novel
from ..data import sample_prompts

# what the input-grounded workload asks (round robin): the answer copies or closely follows the passage
GROUNDED_TASKS = (
    "Repeat the following passage word for word.",
    "Quote the following passage exactly, in quotation marks.",
    "Summarise the following passage, quoting its key sentences.",
)


def mixed_workload(
    n: int = 64,
    seed: int = 0,
    short: tuple[int, int] = (8, 64),
    long: tuple[int, int] = (192, 256),
    long_fraction: float = 0.2,
) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompts of 4-24 words from held-out text; output lengths short
    (uniform in `short`) or, with probability `long_fraction`, long (uniform in `long`)."""
    if n < 1 or not 0 <= long_fraction <= 1:
        raise ValueError(f"need n >= 1 and long_fraction in [0, 1], got {n}, {long_fraction}")
    gen = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n, seed=seed)
    lengths = []
    for _ in range(n):
        lo, hi = long if torch.rand(1, generator=gen).item() < long_fraction else short
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen).item()))
    return list(zip(prompts, lengths))


def grounded_workload(
    tokenizer, n: int = 6, chars: tuple[int, int] = (400, 900)
) -> list[list[int]]:
    """n chat prompts (token ids, the tokenizer's chat template applied) asking an instruct model to repeat,
    quote or summarise a held-out Pride and Prejudice paragraph of `chars` characters: the workload where
    an answer grounded in its input makes prompt-lookup speculative decoding pay (speculative.py)."""
    _, heldout = split_novel("prideprejudice")
    passages = [p for p in heldout if chars[0] <= len(p) <= chars[1]][:n]
    if len(passages) < n:
        raise ValueError(f"only {len(passages)} held-out paragraphs of {chars} characters; lower n")
    prompts = []
    for i, passage in enumerate(passages):
        task = GROUNDED_TASKS[i % len(GROUNDED_TASKS)]
        chat = [{"role": "user", "content": f"{task}\n\n{passage}"}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def latency_summary(
    arrival: float, first_token: dict, finished: dict, n_tokens: int, wall: float
) -> dict:
    """All requests arrive at `arrival`; latency = time until the request's last token, TTFT = first."""
    lat = sorted(t - arrival for t in finished.values())
    ttft = sorted(t - arrival for t in first_token.values())
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "output_tokens": n_tokens,
        "wall_s": wall,
        "tokens_per_s": n_tokens / wall,
        "latency_mean_s": statistics.mean(lat),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p90_s": pct(lat, 0.9),
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p90_s": pct(ttft, 0.9),
    }


def run_engine(engine, workload: list[tuple[str, int]], tag: str = "req") -> dict:
    """Submit the whole workload at once to a labkit LLMEngine, step until done, time every request."""
    from .sampling import SamplingParams

    start = time.perf_counter()
    for i, (prompt, n) in enumerate(workload):
        engine.add_request(
            f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        )
    first: dict[str, float] = {}  # request id -> time of its first token
    done: dict[str, float] = {}  # request id -> time of its last token
    tokens = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            tokens += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = now
    return latency_summary(start, first, done, tokens, time.perf_counter() - start)
