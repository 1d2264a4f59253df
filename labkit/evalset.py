"""The course's multiple-choice items, written from the held-out Austen text by a fixed rule.

Perplexity averages over every token, so a model can lose a point of it and still answer as before, or
keep it and start getting words wrong. A multiple-choice test counts answers: each item is a passage
cut just before the last word of a sentence, and four words to end it with, one of them Austen's
(LAMBADA's idea, with choices so that it is scored by log-likelihood the way lm-eval-harness scores
HellaSwag or ARC). The three wrong words are last words of other sentences of the same novel, so
every choice is a word that can end a sentence and only the passage tells which one does here.

    python -m labkit.evalset        # rewrites data/eval/austen_mc.jsonl (tests check it is unchanged)

Each line of the file is {"context": str, "choices": [str, ...], "answer": int} plus "id" and
"source" (novel, held-out paragraph): the context never ends with a space and no choice starts with
one; the scorer puts one space between them (lm-eval-harness's default target delimiter).
"""

import json
import random
import re
import sys

from .corpus import NOVELS, split_novel
from .paths import EVAL_DIR

MC_FILE = EVAL_DIR / "austen_mc.jsonl"
ITEMS_PER_NOVEL = 20
N_CHOICES = 4
CONTEXT_WORDS = (30, 60)  # at least / at most this many words before the missing one
SEED = 0
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# a lower-case word of 4+ letters, then the sentence's closing punctuation (and maybe a quote)
LAST_WORD = re.compile(r"^(.*\S)\s+([a-z]{4,})([.!?][\"']?)$")


def candidates(novel: str) -> list[dict]:
    """Every held-out sentence whose last word is a plain word with enough text before it."""
    found = []
    for p, paragraph in enumerate(split_novel(novel)[1]):
        sentences = SENTENCE_END.split(paragraph)
        for s, sentence in enumerate(sentences):
            match = LAST_WORD.match(sentence)
            if not match:
                continue
            context = opening(sentences[:s], match.group(1))
            if len(context.split()) < CONTEXT_WORDS[0]:
                continue
            found.append(
                dict(
                    context=context,
                    answer=match.group(2),
                    source=f"{novel}, held-out paragraph {p}",
                )
            )
    return found


def opening(previous: list[str], start: str) -> str:
    """The sentence's start, after as many whole previous sentences as fit in CONTEXT_WORDS[1] words."""
    words = start.split()[-CONTEXT_WORDS[1] :]
    for sentence in reversed(previous):
        if len(words) + len(sentence.split()) > CONTEXT_WORDS[1]:
            break
        words = sentence.split() + words
    return " ".join(words)


def build(items_per_novel: int = ITEMS_PER_NOVEL, seed: int = SEED) -> list[dict]:
    """The items, the same on every machine: random.Random(seed) picks sentences and distractors."""
    rng = random.Random(seed)
    items: list[dict] = []
    for novel in NOVELS:
        pool = candidates(novel)
        words = sorted({c["answer"] for c in pool})
        for c in rng.sample(pool, min(items_per_novel, len(pool))):
            wrong = rng.sample([w for w in words if w != c["answer"]], N_CHOICES - 1)
            answer = rng.randrange(N_CHOICES)
            choices = wrong[:answer] + [c["answer"]] + wrong[answer:]
            items.append(
                dict(
                    id=f"austen-mc-{len(items):03d}",
                    context=c["context"],
                    choices=choices,
                    answer=answer,
                    source=c["source"],
                )
            )
    return items


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def load_items(path=MC_FILE) -> list[dict]:
    """The items of a JSONL file, checked: context, choices and a valid answer index on every line."""
    items = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        item = json.loads(line)
        choices = item.get("choices")
        if not isinstance(item.get("context"), str) or not isinstance(choices, list):
            raise ValueError(f"{path}:{n}: need a 'context' string and a 'choices' list")
        if not isinstance(item.get("answer"), int) or not 0 <= item["answer"] < len(choices):
            raise ValueError(f"{path}:{n}: 'answer' must index 'choices' (0..{len(choices) - 1})")
        items.append(item)
    return items


def main() -> int:
    MC_FILE.parent.mkdir(parents=True, exist_ok=True)
    items = build()
    MC_FILE.write_text(to_jsonl(items), encoding="utf-8")
    print(f"wrote {len(items)} items to {MC_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
