"""Quality beyond perplexity: does the quantized model still *answer* the way the reference does?

Two small offline tests, both in data/eval/ (see its README):

- Multiple choice, scored by log-likelihood exactly as lm-eval-harness scores HellaSwag or ARC: for
  each item the model gives every choice a log-probability, log p(" " + choice | context), summed
  over the choice's tokens; `acc` counts items where Austen's word gets the highest, `acc_norm` where
  it gets the highest per character of the choice (lm-eval's length normalisation). The items
  (austen_mc.jsonl) are cloze passages from the held-out Austen text (labkit/evalset.py).
- Chat facts: a few questions answered greedily through the chat template, each answer compared
  token for token with the reference model's answer (and checked for the expected word).

Token handling follows lm-eval-harness's `_encode_pair`: the context and the context + continuation
are tokenized separately (no special tokens) and the continuation is whatever the second adds, so a
BPE merge across the boundary is scored the way lm-eval scores it.

Fast path: the four choices share their context, so the context runs once and each choice is scored
on top of its KV cache (batch_repeat_interleave); `choice_logprobs_reference` runs every
context + choice in full, the plain way, and the tests check both agree.
"""

import inspect
import json

import torch
import torch.nn.functional as F

from .evalset import MC_FILE, load_items
from .paths import EVAL_DIR

CHAT_FILE = EVAL_DIR / "chat_facts.jsonl"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness splits them."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:n_context], whole[n_context:]


def _device(model):
    return next(model.parameters()).device


def _cache_kwarg(model, cache) -> dict:
    """transformers 5.24 renamed forward's past_key_values to cache (the old name warns until 5.40)."""
    names = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in names else "past_key_values": cache}


@torch.no_grad()
def choice_logprobs_reference(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context) for each choice: one full forward pass per choice."""
    scores = []
    for choice in choices:
        ctx, cont = encode_pair(tokenizer, context, " " + choice)
        x = torch.tensor([ctx + cont], device=_device(model))
        logp = F.log_softmax(model(input_ids=x).logits[0, len(ctx) - 1 : -1].float(), dim=-1)
        scores.append(logp.gather(-1, torch.tensor(cont, device=x.device)[:, None]).sum().item())
    return scores


@torch.no_grad()
def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """The same numbers, with the shared context computed once and kept in the KV cache."""
    pairs = [encode_pair(tokenizer, context, " " + c) for c in choices]
    ctx = pairs[0][0]
    if any(p[0] != ctx for p in pairs):  # a choice merged into the context's last token
        return choice_logprobs_reference(model, tokenizer, context, choices)
    device = _device(model)
    conts = [cont for _, cont in pairs]
    # the context, then every choice but its last token: [n_choices, longest - 1], right-padded
    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each choice's first token
    scores = [first[cont[0]].item() for cont in conts]
    longest = max(len(cont) for cont in conts)
    if longest > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(conts))
        x = torch.tensor([c[:-1] + [0] * (longest - len(c)) for c in conts], device=device)
        logp = F.log_softmax(model(input_ids=x, **_cache_kwarg(model, cache)).logits.float(), -1)
        for i, cont in enumerate(conts):  # padding comes after each choice: causal, so unseen
            for t, token in enumerate(cont[1:]):
                scores[i] += logp[i, t, token].item()
    return scores


def multiple_choice(model, tokenizer, items: list[dict] | None = None) -> dict:
    """{'acc', 'acc_norm', 'items'} over the items (default: data/eval/austen_mc.jsonl)."""
    items = load_items(MC_FILE) if items is None else items
    correct = correct_norm = 0
    for item in items:
        scores = choice_logprobs(model, tokenizer, item["context"], item["choices"])
        per_char = [s / len(c) for s, c in zip(scores, item["choices"])]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == item["answer"]
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def load_chat_prompts(path=CHAT_FILE) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@torch.no_grad()
def chat_answers(model, tokenizer, prompts: list[dict] | None = None, max_new_tokens: int = 32):
    """Greedy answer token ids to each prompt, through the model's chat template."""
    prompts = load_chat_prompts() if prompts is None else prompts
    answers = []
    for p in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(_device(model))
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return answers


def compare_answers(answers, reference, tokenizer, prompts: list[dict] | None = None) -> dict:
    """Agreement with the reference's answers, token for token, and how many name the expected fact.

    same: answers identical to the reference's; prefix: mean share of the reference's tokens
    reproduced before the first difference; mentions: answers containing an accepted word.
    """
    prompts = load_chat_prompts() if prompts is None else prompts
    same, prefix, mentions = 0, 0.0, 0
    for ans, ref, p in zip(answers, reference, prompts):
        same += ans == ref
        n = next((i for i, (a, r) in enumerate(zip(ans, ref)) if a != r), min(len(ans), len(ref)))
        prefix += n / max(len(ref), 1)
        text = tokenizer.decode(ans, skip_special_tokens=True).lower()
        mentions += any(word.lower() in text for word in p["accept"])
    n = len(prompts)
    return {"chat_same": same / n, "chat_prefix": prefix / n, "chat_mentions": mentions / n}


def quality(model, tokenizer, reference_answers=None, items=None, prompts=None) -> dict:
    """Multiple-choice accuracy and chat agreement with `reference_answers` (from chat_answers on
    the reference model; without them, the model is compared with itself: chat_same = 1)."""
    answers = chat_answers(model, tokenizer, prompts)
    reference_answers = answers if reference_answers is None else reference_answers
    return {
        **multiple_choice(model, tokenizer, items),
        **compare_answers(answers, reference_answers, tokenizer, prompts),
    }
