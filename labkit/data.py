"""Token streams for evaluation and calibration, cut from the Austen corpus for any tokenizer.

Held-out text (the last 5% of each novel) is used for perplexity; calibration samples for PTQ/GPTQ/AWQ
come from the *training* split, so calibration never peeks at the evaluation text.
"""

import torch

from .corpus import corpus_text


def token_stream(tokenizer, split: str = "heldout", max_tokens: int | None = None) -> torch.Tensor:
    """The split as one 1-D LongTensor of token ids (optionally truncated to max_tokens)."""
    ids = tokenizer(corpus_text(split), return_attention_mask=False, verbose=False)[
        "input_ids"
    ]  # no 512-token warning: we window it ourselves
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def heldout_ids(tokenizer, max_tokens: int | None = 16384) -> torch.Tensor:
    return token_stream(tokenizer, "heldout", max_tokens)


def calibration_batches(
    tokenizer, n_samples: int = 64, seq_len: int = 256, seed: int = 0
) -> torch.Tensor:
    """n_samples random windows of seq_len tokens from the training split, shape [n_samples, seq_len]."""
    stream = token_stream(tokenizer, "train")
    if len(stream) <= seq_len:
        raise ValueError(
            f"seq_len {seq_len} is longer than the training stream ({len(stream)} tokens)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts])


def sample_prompts(n: int = 8, seed: int = 0, min_words: int = 4, max_words: int = 24) -> list[str]:
    """Opening words of random held-out paragraphs: realistic prompts of mixed length."""
    paras = [p for p in corpus_text("heldout").split("\n") if len(p.split()) >= max_words]
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        para = paras[torch.randint(len(paras), (1,), generator=gen).item()]
        words = torch.randint(min_words, max_words + 1, (1,), generator=gen).item()
        prompts.append(" ".join(para.split()[:words]))
    return prompts
