"""What a quantized KV cache costs in quality and buys in capacity, measured through labkit's engine.

Quality: the same text scored by engines whose caches differ only in kv_cache_dtype. `prompt_logits`
runs one scoring request (max_tokens=0) as a single prefill chunk and keeps every position's logits, so the
comparison sees the whole distribution, not only the sampled token:
    perplexity   exp(mean NLL of the true next token)                  (what the targets bound)
    KL           mean over positions of KL(p_float || p_quantized)     (how far each distribution moved)
    top-1 agree  share of positions whose most likely token is unchanged
Only positions with at least `context` tokens before them are scored: the KV error grows with the keys a
query reads, so a short-context score would flatter the cache.

Multiple choice: `multiple_choice` scores data/eval/austen_mc.jsonl as labkit.quality does (lm-eval's
log-likelihood of each choice after its context), every context + choice a scoring request to an engine
with the given cache. The contexts are short (a paragraph), so it tests the cache at short range.

Capacity: `blocks_at_budget` is what the engine's budget (kv_cache.default_num_blocks) gives each dtype.
"""

import math
from dataclasses import dataclass

import torch

from .engine import LLMEngine, SamplingParams
from .engine.kv_cache import KVShape, default_num_blocks
from .engine.kv_quant import bytes_per_token
from .evalset import MC_FILE, load_items
from .quality import encode_pair


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids) - 1, vocab] (float32) that predict ids[1:], from one step of `engine`: its whole
    prompt must fit one chunk (max_num_batched_tokens >= len(ids)). The step is the engine's own (schedule,
    run, process), so the request is finished and its blocks freed afterwards."""
    engine.add_request("score", ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    chunks = engine.scheduler.schedule()
    if len(chunks) != 1 or chunks[0].num_tokens != len(ids):
        raise ValueError(
            f"the {len(ids)}-token prompt must run as one chunk: raise max_num_batched_tokens"
        )
    step = engine.runner.prepare(chunks)
    logits = engine.runner.run(step)
    engine.processor.process(chunks, step.rows, logits)
    return logits.float()


@dataclass
class Divergence:
    """Sums over scored positions (add windows together, then read the means)."""

    positions: int = 0
    nll: float = 0.0  # of the true next token, under the tested cache
    nll_reference: float = 0.0  # the same, under the reference cache
    kl: float = 0.0  # KL(reference || tested), nats
    top1_agree: int = 0

    def add(self, reference: torch.Tensor, tested: torch.Tensor, targets: torch.Tensor) -> None:
        """reference, tested [n, vocab] logits at the scored positions; targets [n] the true next tokens."""
        log_p, log_q = reference.double().log_softmax(-1), tested.double().log_softmax(-1)
        rows = torch.arange(len(targets))
        self.positions += len(targets)
        self.nll -= float(log_q[rows, targets].sum())
        self.nll_reference -= float(log_p[rows, targets].sum())
        self.kl += float((log_p.exp() * (log_p - log_q)).sum())
        self.top1_agree += int((reference.argmax(-1) == tested.argmax(-1)).sum())

    def summary(self) -> dict:
        ppl, ppl_ref = (math.exp(x / self.positions) for x in (self.nll, self.nll_reference))
        return {
            "scored_tokens": self.positions,
            "perplexity": ppl,
            "perplexity_reference": ppl_ref,
            "perplexity_increase": ppl / ppl_ref - 1,
            "kl_per_token": self.kl / self.positions,
            "top1_agreement": self.top1_agree / self.positions,
        }


def score_windows(
    model, tokenizer, windows: list[list[int]], kv_cache_dtypes: list, context: int
) -> dict:
    """For each kv_cache_dtype: its Divergence summary against "auto" (the model's dtype) over `windows`,
    scoring the positions with >= `context` tokens before them. One engine per dtype, each window scored
    by all of them before the next (only two windows' logits are held at once)."""
    longest = max(len(w) for w in windows)
    engines = {
        dtype: LLMEngine(
            model,
            tokenizer,
            kv_cache_dtype=dtype,
            max_num_seqs=1,
            max_num_batched_tokens=longest,
            num_blocks=-(-longest // 16) + 1,
            enable_prefix_caching=False,
            enforce_eager=True,
        )
        for dtype in ["auto", *kv_cache_dtypes]
    }
    sums = {dtype: Divergence() for dtype in kv_cache_dtypes}
    for ids in windows:
        targets = torch.tensor(ids[context:])
        reference = prompt_logits(engines["auto"], ids)[context - 1 :]
        for dtype in kv_cache_dtypes:
            sums[dtype].add(reference, prompt_logits(engines[dtype], ids)[context - 1 :], targets)
    return {str(dtype): s.summary() for dtype, s in sums.items()}


def multiple_choice(model, tokenizer, kv_cache_dtype, items: list[dict] | None = None) -> dict:
    """{'acc', 'acc_norm', 'items'} as labkit.quality.multiple_choice computes them, through the engine."""
    items = load_items(MC_FILE) if items is None else items
    engine = LLMEngine(
        model, tokenizer, kv_cache_dtype=kv_cache_dtype, max_num_seqs=32, enforce_eager=True
    )
    spans = {}  # request id "item/choice" -> the positions of the choice's tokens
    for i, item in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            ctx, cont = encode_pair(tokenizer, item["context"], " " + choice)
            spans[f"{i}/{c}"] = slice(len(ctx), len(ctx) + len(cont))
            engine.add_request(
                f"{i}/{c}", ctx + cont, SamplingParams(max_tokens=0, prompt_logprobs=0)
            )
    scores = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:  # index p: the logprob of prompt token p
                span = out.prompt_logprobs[spans[out.request_id]]
                scores[out.request_id] = sum(lp.logprob for lp in span if lp is not None)
    correct = correct_norm = 0
    for i, item in enumerate(items):
        choice_scores = [scores[f"{i}/{c}"] for c in range(len(item["choices"]))]
        per_char = [s / len(c) for s, c in zip(choice_scores, item["choices"])]
        correct += max(range(len(choice_scores)), key=choice_scores.__getitem__) == item["answer"]
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == item["answer"]
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def blocks_at_budget(
    shape: KVShape,
    kv_cache_dtype,
    model_dtype: torch.dtype,
    budget_bytes: int,
    block_size: int = 16,
) -> int:
    """KV blocks the engine's CPU budget rule gives a dtype (capped by budget only: many sequences asked)."""
    per_token = bytes_per_token(shape, kv_cache_dtype, model_dtype)
    return default_num_blocks(
        shape, per_token, block_size, 10**9, torch.device("cpu"), cpu_budget_bytes=budget_bytes
    )
