"""Train the course's LoRA adapters for SmolLM2-135M-Instruct with `peft`: minutes each on a CPU.

Notebook 08d and the LoRA engine (labkit/engine/lora.py) serve several fine-tunes of one base model side by
side. These are those fine-tunes: each a rank-8 LoRA on the four attention projections (about 3.7 MB in
float32), each with an effect one can see in a greedy continuation:
- `emma`, `persuasion`, `pride`: plain next-token training on one novel's training split (the held-out 5%
  is never seen, labkit/corpus.py): the continuation drifts to that novel's people and places;
- `shout`: a formatting task, Austen's text in upper case: text begun in capitals goes on in capitals
  (the base model drifts back to lower case).

    .venv/bin/python -m labkit.lora_train                    # all four into adapters/ (make lora-adapters)
    .venv/bin/python -m labkit.lora_train --only emma --steps 2 --out /tmp/x      # a smoke run

Everything is seeded (the windows drawn, the LoRA initialisation), so one command rebuilds the same
adapters up to the CPU's float rounding. Each adapter directory gets peft's own files
(adapter_config.json, adapter_model.safetensors) and training.json: the command, the data, the loss
curve and the evaluation (held-out perplexity on its own text, base model vs adapter).
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import split_novel
from .model import SMOLLM2, load_model
from .paths import REPO_ROOT

ADAPTERS_DIR = REPO_ROOT / "adapters"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, LENGTH = 4, 64  # windows a step, tokens a window: 256 tokens, about 5 s a step on 2 cores
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapter_config.json names as the base


@dataclass(frozen=True)
class Task:
    name: str
    novel: str  # labkit.corpus name of the text it trains on
    upper: bool = False  # the text in capitals (the formatting task)

    def text(self, split: int) -> str:
        """Its training (0) or held-out (1) text, paragraphs joined by newlines."""
        text = "\n".join(split_novel(self.novel)[split])
        return text.upper() if self.upper else text


TASKS = {
    t.name: t
    for t in (
        Task("emma", "emma"),
        Task("persuasion", "persuasion"),
        Task("pride", "prideprejudice"),
        Task("shout", "northangerabbey", upper=True),
    )
}


def windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """n random windows of `length` tokens from a 1-D stream: [n, length]."""
    starts = torch.randint(0, len(ids) - length, (n,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int = 128, max_windows: int = 16) -> float:
    """Perplexity over the first max_windows non-overlapping windows of a stream."""
    losses = []
    for i in range(min(max_windows, len(ids) // length)):
        x = ids[i * length : (i + 1) * length][None]
        losses.append(model(x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses))


def train(task: Task, out: Path, steps: int, rank: int, seed: int, eval_windows: int = 16) -> dict:
    """Train one adapter into `out`; its record (training.json)."""
    from peft import LoraConfig, get_peft_model  # training only: the engine reads the files itself

    torch.manual_seed(seed)
    base, tokenizer = load_model(SMOLLM2)
    stream = lambda split: torch.tensor(tokenizer(task.text(split))["input_ids"])  # noqa: E731
    train_ids, heldout_ids = stream(0), stream(1)
    base_ppl = perplexity(base, heldout_ids, max_windows=eval_windows)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0
    )
    model = get_peft_model(base, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        x = windows(train_ids, BATCH, LENGTH, gen)  # [BATCH, LENGTH]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"{task.name} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    record = {
        "command": f"python -m labkit.lora_train --only {task.name} --steps {steps}",
        "base_model": "SmolLM2-135M-Instruct (labkit.smollm2)",
        "data": f"labkit.corpus {task.novel}, training split"
        + (", upper-cased" if task.upper else ""),
        "steps": steps,
        "tokens_per_step": BATCH * LENGTH,
        "rank": rank,
        "target_modules": TARGET_MODULES,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "losses": losses,
        "heldout_perplexity": {
            "base": round(base_ppl, 2),
            "adapter": round(perplexity(model, heldout_ids, max_windows=eval_windows), 2),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(
        missing_ok=True
    )  # peft's empty model card; adapters/README.md says it all
    config_file = out / "adapter_config.json"
    saved = json.loads(config_file.read_text())  # the base by its hub name, not this machine's path
    config_file.write_text(
        json.dumps({**saved, "base_model_name_or_path": BASE_NAME}, indent=2) + "\n"
    )
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", choices=sorted(TASKS), action="append", help="train these (default: all)"
    )
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per adapter")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=ADAPTERS_DIR, help="one directory per adapter under it"
    )
    args = ap.parse_args(argv)
    for name in args.only or sorted(TASKS):
        record = train(TASKS[name], args.out / name, args.steps, args.rank, args.seed)
        print(name, json.dumps(record["heldout_perplexity"]), f"{record['train_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
