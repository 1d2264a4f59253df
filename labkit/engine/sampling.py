"""Sampling: turn the last position's logits into the next token, per request.

Each request carries its own `SamplingParams`, so one batch can mix greedy and sampled requests. A request
with a `seed` owns a private random generator: its tokens then do not depend on what else was in the
batch (the property that makes batched and unbatched results comparable).
"""

import math
from dataclasses import dataclass

import torch

from .config import INT64_MAX, require_int
from .structured import StructuredOutputsParams

MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's limit for logprobs)
MAX_N = 16  # parallel samples per request at most


@dataclass
class SamplingParams:
    """Same names and meanings as vLLM's `SamplingParams` (the subset this course uses).

    Every value is checked here, once: a value the sampler cannot use (a top_p that is 0 in float32, an
    infinite temperature, a seed that does not fit in int64, True where a number belongs) is a ValueError
    naming the parameter, never a failure later inside a batch that other requests share."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability adds up to top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1, vLLM's spelling) = all
    max_tokens: int = (
        16  # new tokens to generate at most; 0 (with prompt_logprobs) = only score the prompt
    )
    # finish when one of these is generated (it is kept in the ids)
    stop_token_ids: list[int] | None = None
    # finish when the text contains one of these (cut from the text)
    stop: list[str] | str | None = None
    # a private generator for this request: reproducible regardless of batch
    seed: int | None = None
    # keep going past the end-of-sequence token (benchmarks want fixed lengths)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of the same prompt; they share the prompt's KV blocks
    # None: no logprobs; k: each generated token's logprob and the k most likely alternatives
    logprobs: int | None = None
    # the same for every prompt token (the first has none: nothing precedes it); what `echo` shows
    prompt_logprobs: int | None = None
    # constrain the output to a JSON schema, a regex, a choice, a grammar (structured.py)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        require_float("temperature", self.temperature, "a number >= 0 (0 = greedy)", zero_ok=True)
        require_float("top_p", self.top_p, "in (0, 1]", zero_ok=False)
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        require_int("top_k", self.top_k, low=-1, hint="an int (0 or -1 = no limit)")
        if self.top_k == -1:
            self.top_k = 0
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), 0, MAX_LOGPROBS, hint="None or an int")
        lowest = 0 if self.prompt_logprobs is not None else 1
        require_int("max_tokens", self.max_tokens, lowest, hint="an int (0 needs prompt_logprobs)")
        require_int("n", self.n, 1, MAX_N)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not all(
                is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids
            ):
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
        if self.seed is not None:
            require_int("seed", self.seed, -(2**63), hint="None or an int")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                "structured_outputs must be a StructuredOutputsParams, got "
                f"{type(self.structured_outputs).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def require_float(name: str, value, rule: str, zero_ok: bool) -> None:
    """A finite, non-negative real number (not a bool) that stays non-zero in float32 unless it is 0: the
    sampler computes in float32, where 1e-300 is 0 and dividing by it or keeping "the top 0%" breaks."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    as_float32 = torch.tensor(float(value), dtype=torch.float32).item()
    if value != 0 and (as_float32 == 0 or not math.isfinite(as_float32)):
        raise ValueError(
            f"{name} must be {rule} and representable in float32 (about 1e-38 .. 3e38), got {value!r}"
        )


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the `k` most likely tokens at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """For each row of logits [R, V] (the raw model output, before temperature or filters, as vLLM and
    OpenAI report it): the logprob of token_ids[r] and the top k alternatives."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
    return [
        TokenLogprob(t, lp, list(zip(ids, values)))
        for t, lp, ids, values in zip(
            token_ids, chosen.tolist(), top_ids.long().tolist(), top_values.tolist()
        )
    ]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude, row by row. logits [B, V] already divided by temperature;
    top_k [B] (0 = keep all), top_p [B]. One sort serves both filters; the top token is never masked, so
    every row keeps a valid distribution."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # drop a token if the tokens ranked above it already reach top_p (the top token always survives)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False  # whatever the filters say, the most likely token stays possible
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The distribution each row samples from: logits [B, V] (float32), temperature, top_k, top_p [B]."""
    # subtract each row's max first: then the top logit is 0 whatever the temperature and no
    # division can overflow to inf (a tiny temperature just sends the others to -inf: greedy)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)
    return filter_logits(scaled, top_k, top_p).softmax(dim=-1)


def request_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """probabilities() for rows of logits [R, V] that all belong to one request (speculative decoding)."""
    rows, dev = logits.shape[0], logits.device
    return probabilities(
        logits.float(),
        torch.full((rows,), params.temperature, device=dev),
        torch.full((rows,), params.top_k, device=dev),
        torch.full((rows,), params.top_p, device=dev),
    )


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
        probs = probabilities(logits[idx], temp, top_k, top_p)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:  # unseeded rows: one batched draw from the engine's generator
            drawn = torch.multinomial(probs[shared], 1, generator=default_generator).squeeze(1)
            tokens[idx[shared]] = drawn
        for j, i in enumerate(rows):
            if generators[i] is not None:
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).item()
    return tokens.tolist()
