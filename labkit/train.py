"""Train the course model: a small Llama (RMSNorm, RoPE, SwiGLU) on the Austen corpus.

    python -m labkit.train --out course_model --steps 1800

Students never need to run this (the trained checkpoint ships in `course_model/`); it is here so the
model is reproducible and so you can see that "pretraining" is just next-token prediction in a loop.
Training uses Hugging Face's `LlamaForCausalLM`, so the result is an ordinary model directory that
`AutoModelForCausalLM`, vLLM, GPTQModel and llm-compressor all load.
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .corpus import NOVELS, split_novel
from .tokenizer import train_tokenizer


def course_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """One long 1-D tensor: each novel's paragraphs (one per line) followed by an end-of-text token."""
    index = 0 if split == "train" else 1
    ids = []
    for name in NOVELS:
        ids += tokenizer("\n".join(split_novel(name)[index]))["input_ids"] + [
            tokenizer.eos_token_id
        ]
    return torch.tensor(ids, dtype=torch.long)


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> None:
    """GPT-2-style dropout on each attention and MLP output, only while training.

    HF's Llama has no residual dropout, so we add it with forward hooks; the saved model is unchanged.
    """

    def attn_hook(module, args, output):
        if not module.training:
            return output
        return (torch.nn.functional.dropout(output[0], p, True),) + tuple(output[1:])

    def mlp_hook(module, args, output):
        return torch.nn.functional.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(attn_hook)
        layer.mlp.register_forward_hook(mlp_hook)


def adamw(model, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )


def random_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """batch random windows of seq_len tokens from a 1-D stream: [batch, seq_len]."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    windows = stream[: n * seq_len].view(n, seq_len)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("course_model"))
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    heldout_text = "\n".join(p for n in NOVELS for p in split_novel(n)[1])
    train_text = "\n".join(p for n in NOVELS for p in split_novel(n)[0])
    tokenizer = train_tokenizer(train_text)
    train_ids, heldout_ids = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
    print(
        f"tokens: train {len(train_ids):,}  held-out {len(heldout_ids):,}  "
        f"chars/token {len(heldout_text) / len(heldout_ids):.2f}"
    )

    tokenizer.save_pretrained(args.out)
    model = LlamaForCausalLM(course_config(tokenizer))
    add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M")

    opt = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train": [],
        "heldout": [],
    }
    start = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="training", mininterval=10)
    for step in bar:
        batch = random_batch(train_ids, args.batch, args.seq_len, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train"].append([step, round(loss.item(), 4)])
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = heldout_loss(model, heldout_ids, args.seq_len)
            log["heldout"].append([step + 1, round(val, 4)])
            elapsed = time.time() - start
            tok_s = (step + 1) * args.batch * args.seq_len / elapsed
            print(
                f"step {step + 1}: held-out loss {val:.3f} (ppl {math.exp(val):.1f}), {tok_s:,.0f} tok/s, "
                f"{elapsed / 60:.1f} min",
                flush=True,
            )
            log["seconds"] = round(elapsed, 1)
            model.save_pretrained(args.out, safe_serialization=True)
            (args.out / "training_log.json").write_text(json.dumps(log))
    model = model.to(torch.float16)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(log))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
