"""How good is a (quantized) model? Perplexity, and how far it drifts from a reference model.

Perplexity alone hides a lot: two models can have the same perplexity yet disagree on many tokens.
So beside it we report the KL divergence KL(reference || model) per token and top-1 agreement (how
often both models pick the same next token), the way llama.cpp and vLLM quantization reports do.
"""

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import context_length


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, end, first_scored) over a stream of n_tokens.

    Every token but the first is scored exactly once. The first window scores all its tokens; each later
    one scores up to `stride` new tokens (at most window - 1, since a token needs at least one token of
    context) and fills the rest of the window with left context: a smaller stride means more context per
    prediction and more compute.
    """
    if window < 2 or stride < 1:
        raise ValueError(f"need window >= 2 and stride >= 1, got window={window}, stride={stride}")
    step = min(stride, window - 1)
    spans: list[tuple[int, int, int]] = []
    scored = 1  # token 0 has no left context, so it is never scored
    while scored < n_tokens:
        # the first window scores all it can
        end = min(scored + (step if spans else window - 1), n_tokens)
        spans.append((max(0, end - window), end, scored))
        scored = end
    return spans


@torch.no_grad()
def evaluate_lm(
    model,
    ids: torch.Tensor,
    reference=None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity of `model` on a 1-D token stream; with `reference`, also mean KL and top-1 agreement.

    Windows of equal length are batched together, so this is fast on a CPU and a GPU alike.
    """
    if ids.dim() != 1 or len(ids) < 2:
        raise ValueError("ids must be a 1-D tensor with at least 2 tokens")
    window = window or min(512, context_length(model))
    stride = stride or window
    if window > context_length(model):
        raise ValueError(
            f"window {window} exceeds the model's context length {context_length(model)}"
        )
    device = next(model.parameters()).device
    spans = windows(len(ids), window, stride)
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    groups = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    for group in tqdm(groups, desc="evaluating", disable=not progress, leave=False):
        # batch spans of the same length; a final shorter span goes on its own
        for same in _by_length(group):
            x = torch.stack([ids[b:e] for b, e, _ in same]).to(device)
            logp = F.log_softmax(model(input_ids=x).logits.float(), dim=-1)
            ref_logp = (
                F.log_softmax(reference(input_ids=x).logits.float(), dim=-1)
                if reference is not None
                else None
            )
            for row, (b, e, first) in enumerate(same):
                pred = slice(first - b - 1, e - b - 1)  # logits at position t predict token t+1
                targets = x[row, first - b : e - b]
                lp = logp[row, pred]
                nll -= lp.gather(-1, targets[:, None]).sum().item()
                count += len(targets)
                if ref_logp is not None:
                    rp = ref_logp[row, pred]
                    kl += (rp.exp() * (rp - lp)).sum().item()
                    agree += (rp.argmax(-1) == lp.argmax(-1)).sum().item()
    out = {"perplexity": math.exp(nll / count), "tokens": count}
    if reference is not None:
        out["kl"] = kl / count
        out["top1"] = agree / count
    return out


def _by_length(spans):
    lengths: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        lengths.setdefault(span[1] - span[0], []).append(span)
    return lengths.values()


def memory_bytes(model) -> int:
    """Bytes held by parameters and buffers (a tied embedding/output matrix is counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def disk_bytes(path) -> int:
    """Size on disk of a saved model: a single file, or every file in a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def saved_bytes(model) -> int:
    """Save `model.state_dict()` with torch.save to a temp file and report its size: works for any
    module, quantized or not (safetensors refuses some quantized tensor types)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
