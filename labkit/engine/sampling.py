"""Sampling: turn the last position's logits into the next token, per request.

Each request carries its own `SamplingParams`, so one batch can mix greedy and sampled requests. A request
with a `seed` owns a private random generator: its tokens then do not depend on what else was in the
batch (the property that makes batched and unbatched results comparable).
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Same names and meanings as vLLM's `SamplingParams` (the subset this course uses)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability adds up to top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1, vLLM's spelling) = all
    max_tokens: int = 16  # new tokens to generate at most
    # finish when one of these is generated (it is kept in the ids)
    stop_token_ids: list[int] | None = None
    # finish when the text contains one of these (cut from the text)
    stop: list[str] | str | None = None
    # a private generator for this request: reproducible regardless of batch
    seed: int | None = None
    # keep going past the end-of-sequence token (benchmarks want fixed lengths)
    ignore_eos: bool = False

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 0 (0 or -1 = no limit), got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.stop_token_ids is not None:
            if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(
                    f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}"
                )
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(
                    f"stop must be a non-empty string or a list of them, got {self.stop!r}"
                )
            self.stop = list(self.stop)
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude, row by row. logits [B, V] already divided by temperature;
    top_k [B] (0 = keep all), top_p [B]. One sort serves both filters."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # drop a token if the tokens ranked above it already reach top_p (the top token always survives)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> list[int]:
    """One next token per row of logits [B, V]: greedy rows take the argmax, the others sample from the
    filtered distribution, each seeded row with its own generator."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        temp = torch.tensor([params[i].temperature for i in rows], device=dev)
        top_k = torch.tensor([params[i].top_k for i in rows], device=dev)
        top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
        probs = filter_logits(logits[idx] / temp.unsqueeze(1), top_k, top_p).softmax(dim=-1)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:  # unseeded rows: one batched draw from the engine's generator
            drawn = torch.multinomial(probs[shared], 1, generator=default_generator).squeeze(1)
            tokens[idx[shared]] = drawn
        for j, i in enumerate(rows):
            if generators[i] is not None:
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).item()
    return tokens.tolist()
