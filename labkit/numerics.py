"""Numerics of batched inference: why a sequence's logits depend on its batch, and how to compare two runs.

Floating-point addition is not associative, so a sum depends on its order, and a matmul's order depends on
the kernel: a one-row product (a matrix-vector kernel) and a many-row one (a GEMM, possibly splitting the
inner dimension) sum in different orders. A serving engine picks kernels by the number of rows in the step,
which depends on what else is running, so the same prompt can get logits 1e-5 apart alone and in a batch,
and where its top two tokens are that close (a near-tie), a different greedy token. Notebook 05b measures
this on SmolLM2 and the engine's batch-invariant mode that removes it (EngineConfig.batch_invariant).

`Trace` is one request's greedy tokens with each step's top logprobs; `compare` says how two traces of the
same request differ, and `logprobs_close` judges them the way vLLM's tests do (`check_logprobs_close`): the
tokens must be equal until the first difference, and there each run's token must be among the other's top
candidates (a near-tie, not a bug); after that the sequences have diverged and are not compared.
"""

from dataclasses import dataclass


@dataclass
class Trace:
    """One request's generated tokens and, per token, its top candidates as {token id: logprob}."""

    tokens: list[int]
    top: list[dict[int, float]]


@dataclass
class Difference:
    """Two traces of one request: the largest logprob gap over their common prefix (same tokens so far),
    where they first choose differently (None: never), and the top-1 vs top-2 margin there in each run."""

    max_logprob_gap: float
    first_divergence: int | None
    margins: tuple[float, float] | None


def margin(top: dict[int, float]) -> float:
    """Top-1 logprob minus top-2: how close this step was to choosing another token."""
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


def compare(a: Trace, b: Trace) -> Difference:
    gap, first = 0.0, None
    for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta != tb:
            first = i
            break
        shared = a.top[i].keys() & b.top[i].keys()
        gap = max([gap, *(abs(a.top[i][t] - b.top[i][t]) for t in shared)])
    margins = None if first is None else (margin(a.top[first]), margin(b.top[first]))
    return Difference(gap, first, margins)


def logprobs_close(a: Trace, b: Trace) -> bool:
    """vLLM's rule: equal tokens up to the first difference; there, each run's token is in the other's top
    candidates; nothing after it is compared (the two continuations have different contexts)."""
    for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta != tb:
            return ta in b.top[i] and tb in a.top[i]
    return len(a.tokens) == len(b.tokens)
