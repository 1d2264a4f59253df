"""Continuous batching judged as vLLM's paper judges it: two schedulers given the same KV-cache memory.

Static batching over a contiguous KV cache (FasterTransformer; the first Orca) cannot know when an answer
will end, so for every request it admits it reserves room for the prompt plus the most tokens the request
may generate (`max_tokens`), and the batch then runs until its longest member is done: the finished ones
keep their slots (and, in a padded batch, their compute). Paging (vLLM) hands out a 16-token block only
when a sequence reaches it, so the same bytes hold many more *running* sequences; continuous batching
refills a finished sequence's place at the very next step. Comparing the two at an equal *batch size*
(as this course once did) hides the first effect; at equal memory both show.

Workload (`sharegpt_like_lengths`): input/output lengths drawn from log-normal distributions with the
means of the ShareGPT conversations in the vLLM paper's evaluation (Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023, Fig. 11a: mean input 161,
mean output 338 tokens), both multiplied by `scale` so that a CPU run stays short; every request sends
the same `max_tokens` cap, as a server's clients do.

Both policies run on labkit's engine with the same kernels; only admission and memory layout differ.
`run_static_contiguous` packs requests first come, first served into batches whose reservations fit the
budget; `run_continuous_paged` gives the engine exactly budget / block_size blocks. Each reports its
admitted batch sizes, the share of the budget holding real tokens, its decode steps and its throughput,
and its time split between steps that fed prompt tokens and pure decode steps: both policies prefill the same
prompts, work no batching policy can save, so only the decode phase can follow the ratio of decode steps.
"""

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .config import EngineConfig
from .engine import LLMEngine
from .sampling import SamplingParams

SHAREGPT_MEAN_INPUT, SHAREGPT_MEAN_OUTPUT = 161, 338  # vLLM paper, Fig. 11a
LOG_SIGMA = 0.8  # spread of the log-normal lengths: a long tail, as in ShareGPT's histograms


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: (
        int  # the tokens this answer really has (then "EOS": ignore_eos with this max_tokens)
    )


@dataclass
class PolicyRun:
    """What one policy did with the budget. Utilisation = the cache's useful tokens / budget, per step
    (a static batch's padded positions, past a request's own answer, are in the cache but not useful)."""

    policy: str
    wall_s: float
    useful_tokens: (
        int  # tokens the requests asked for (the padded ones of static batching not counted)
    )
    decode_steps: int
    batch_sizes: list[int] = field(default_factory=list)  # running sequences, per step
    kv_utilisation: list[float] = field(default_factory=list)
    reserved_utilisation: list[float] = field(default_factory=list)  # static: reservations / budget
    num_preemptions: int = 0
    token_ids: list[list[int]] = field(default_factory=list)
    prefill_s: float = 0.0  # seconds in steps that fed prompt tokens (a prompt or a chunk of one)
    decode_s: float = 0.0  # seconds in the other steps: every sequence fed one token
    pure_decode_steps: int = 0

    def summary(self) -> dict:
        mean = lambda xs: statistics.mean(xs) if xs else 0.0  # noqa: E731
        return {
            "policy": self.policy,
            "wall_s": self.wall_s,
            "tokens_per_s": self.useful_tokens / self.wall_s,
            "useful_tokens": self.useful_tokens,
            "decode_steps": self.decode_steps,
            "batch_size_mean": mean(self.batch_sizes),
            "batch_size_max": max(self.batch_sizes, default=0),
            "kv_utilisation_mean": mean(self.kv_utilisation),
            "kv_utilisation_max": max(self.kv_utilisation, default=0.0),
            "kv_reserved_mean": mean(self.reserved_utilisation),
            "num_preemptions": self.num_preemptions,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "pure_decode_steps": self.pure_decode_steps,
        }


def sharegpt_like_lengths(
    n: int, scale: float, max_tokens: int, context: int, seed: int = 0
) -> list[tuple[int, int]]:
    """n (input length, output length) pairs, log-normal with the ShareGPT means times `scale`,
    outputs capped at max_tokens and every pair within the context."""
    if n < 1 or scale <= 0 or max_tokens < 1:
        raise ValueError(f"need n >= 1, scale > 0, max_tokens >= 1; got {n}, {scale}, {max_tokens}")
    gen = torch.Generator().manual_seed(seed)

    def draw(mean: float) -> int:  # log-normal with this mean: mu = ln(mean) - sigma^2 / 2
        z = torch.randn(1, generator=gen).item()
        return max(1, round(math.exp(math.log(mean) - LOG_SIGMA**2 / 2 + LOG_SIGMA * z)))

    pairs = []
    for _ in range(n):
        out = min(draw(SHAREGPT_MEAN_OUTPUT * scale), max_tokens)
        inp = min(draw(SHAREGPT_MEAN_INPUT * scale), context - max_tokens)
        pairs.append((inp, out))
    return pairs


def build_workload(token_stream: torch.Tensor, lengths: list[tuple[int, int]]) -> list[Request]:
    """Prompts cut one after another from a token stream (held-out text), with the drawn lengths."""
    if sum(i for i, _ in lengths) > len(token_stream):
        raise ValueError("the token stream is too short for these prompts: pass a longer one")
    ids, at, out = token_stream.tolist(), 0, []
    for inp, k in lengths:
        out.append(Request(ids[at : at + inp], k))
        at += inp
    return out


def static_contiguous_batches(
    workload: list[Request], max_tokens: int, budget_tokens: int
) -> list[list[int]]:
    """Indices of each static batch, first come first served: a request joins the batch while its
    reservation (prompt + max_tokens, contiguous) still fits in the budget."""
    batches: list[list[int]] = [[]]
    reserved = 0
    for i, r in enumerate(workload):
        need = len(r.prompt_ids) + max_tokens
        if need > budget_tokens:
            raise ValueError(
                f"request {i} reserves {need} tokens, more than the whole budget ({budget_tokens})"
            )
        if reserved + need > budget_tokens:
            batches.append([])
            reserved = 0
        batches[-1].append(i)
        reserved += need
    return batches


def _engine(model, tokenizer, budget_tokens: int, max_num_seqs: int) -> LLMEngine:
    config = EngineConfig(
        num_blocks=budget_tokens // EngineConfig.block_size,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,  # distinct prompts: nothing to share, and nothing hidden
    )
    return LLMEngine(model, tokenizer, config)


def _step_all(
    engine: LLMEngine, run: PolicyRun, budget_tokens: int, tokens: dict, useful_len: dict
) -> None:
    """Step until done, recording each step's running sequences, the cache's useful tokens (useful_len:
    request id -> its prompt + its own answer) and its time, as prefill or pure decode (`prompt_backlog`)."""
    # nothing arrives between steps, so each step's backlog after is the next one's before
    backlog = prompt_backlog(engine)
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        seconds = time.perf_counter() - start
        before, backlog = backlog, prompt_backlog(engine)
        if backlog < before:  # the step fed prompt tokens
            run.prefill_s += seconds
        else:
            run.decode_s += seconds
            run.pure_decode_steps += 1
        stats = engine.stats()
        running = engine.scheduler.running
        run.decode_steps += 1
        run.batch_sizes.append(stats.num_running)
        useful = sum(min(s.num_computed_tokens, useful_len[s.request_id]) for s in running)
        run.kv_utilisation.append(useful / budget_tokens)
        run.num_preemptions = stats.num_preemptions


def prompt_backlog(engine: LLMEngine) -> int:
    """Tokens the engine's sequences still have to feed beyond the one a decode step feeds: a waiting
    prompt's, the rest of a chunked one's (and a preempted sequence's, to recompute). A step that lowers it
    fed prompt tokens; a pure decode step leaves it where it was."""
    sequences = [*engine.scheduler.running, *engine.scheduler.waiting]
    return sum(max(0, len(s.token_ids) - s.num_computed_tokens - 1) for s in sequences)


def run_static_contiguous(
    model, tokenizer, workload: list[Request], max_tokens: int, budget_tokens: int
) -> PolicyRun:
    """Each batch: every member runs for the batch's longest answer (the padded work of a static batch);
    its own tokens are cut to its length afterwards. New requests wait for the whole batch to end."""
    batches = static_contiguous_batches(workload, max_tokens, budget_tokens)
    engine = _engine(model, tokenizer, budget_tokens, max_num_seqs=max(map(len, batches)))
    run = PolicyRun("static + contiguous", 0.0, sum(r.output_len for r in workload), 0)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(workload))}
    useful_len = {str(i): len(r.prompt_ids) + r.output_len for i, r in enumerate(workload)}
    start = time.perf_counter()
    for batch in batches:
        longest = max(workload[i].output_len for i in batch)
        reserved = sum(len(workload[i].prompt_ids) + max_tokens for i in batch) / budget_tokens
        for i in batch:
            params = SamplingParams(temperature=0, max_tokens=longest, ignore_eos=True)
            engine.add_request(str(i), workload[i].prompt_ids, params)
        steps_before = run.decode_steps
        _step_all(engine, run, budget_tokens, tokens, useful_len)
        run.reserved_utilisation += [reserved] * (run.decode_steps - steps_before)
    run.wall_s = time.perf_counter() - start
    run.token_ids = [tokens[str(i)][: r.output_len] for i, r in enumerate(workload)]
    return run


def run_continuous_paged(
    model, tokenizer, workload: list[Request], budget_tokens: int, max_num_seqs: int = 256
) -> PolicyRun:
    """The whole workload at once into an engine whose cache holds exactly the budget; each request
    stops at its own length. max_num_seqs = 256 is vLLM's default: memory, not this cap, binds."""
    engine = _engine(model, tokenizer, budget_tokens, max_num_seqs)
    run = PolicyRun("continuous + paged", 0.0, sum(r.output_len for r in workload), 0)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(workload))}
    useful_len = {str(i): len(r.prompt_ids) + r.output_len for i, r in enumerate(workload)}
    start = time.perf_counter()
    for i, r in enumerate(workload):
        params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
        engine.add_request(str(i), r.prompt_ids, params)
    _step_all(engine, run, budget_tokens, tokens, useful_len)
    run.wall_s = time.perf_counter() - start
    run.reserved_utilisation = list(run.kv_utilisation)  # paged: blocks are taken as tokens arrive
    run.token_ids = [tokens[str(i)] for i in range(len(workload))]
    return run


def ceilings(workload: list[Request], max_tokens: int, budget_tokens: int) -> dict:
    """What the policies could gain, from the lengths alone: static batching's padded work (slots
    computed / useful tokens), and its admitted batch size under a max_tokens reservation vs an oracle
    that reserves each request's true length (the vLLM paper's "Orca (Max)" vs "Orca (Oracle)")."""
    batches = static_contiguous_batches(workload, max_tokens, budget_tokens)
    slots = sum(len(b) * max(workload[i].output_len for i in b) for b in batches)
    useful = sum(r.output_len for r in workload)
    true_len = statistics.mean(len(r.prompt_ids) + r.output_len for r in workload)
    reserved_len = statistics.mean(len(r.prompt_ids) + max_tokens for r in workload)
    return {
        "static_batches": len(batches),
        "static_batch_size_mean": len(workload) / len(batches),
        "static_padded_work": slots / useful,
        "static_decode_steps_if_padded": sum(
            max(workload[i].output_len for i in b) for b in batches
        ),
        "reservation_overhead": reserved_len / true_len,  # reserved tokens per real token
        "oracle_batch_size": budget_tokens / true_len,
    }
