"""The Austen corpus: six public-domain novels shipped with the course (see data/corpus/README.md).

Each novel is hard-wrapped at ~70 columns. We join every paragraph onto one line, because a model
trained on hard-wrapped text spends its capacity predicting line breaks. The last 5% of each novel's
paragraphs are held out for evaluation, so perplexity is always measured on text the model never saw.
"""

import lzma
from functools import cache

from .paths import CORPUS_DIR

NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
HELDOUT_FRACTION = 0.05


def read_novel(name: str) -> str:
    path = CORPUS_DIR / f"{name}.txt.xz"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; the corpus ships with the repository (data/corpus/)"
        )
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def paragraphs(text: str) -> list[str]:
    """Split on blank lines and join each paragraph's hard-wrapped lines with single spaces."""
    paras = []
    for block in text.split("\n\n"):
        line = " ".join(block.split())
        if line:
            paras.append(line)
    return paras


@cache
def split_novel(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train paragraphs, held-out paragraphs) for one novel: the held-out part is its last 5%."""
    paras = paragraphs(read_novel(name))
    cut = int(len(paras) * (1 - HELDOUT_FRACTION))
    return tuple(paras[:cut]), tuple(paras[cut:])


def corpus_text(split: str = "train") -> str:
    """All six novels' paragraphs of one split, one paragraph per line, novels separated by a blank line."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    index = 0 if split == "train" else 1
    return "\n\n".join("\n".join(split_novel(n)[index]) for n in NOVELS)
