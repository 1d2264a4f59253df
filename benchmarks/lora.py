"""Many fine-tunes on one server: the course's LoRA adapters (adapters/, labkit.lora_train) served side by side
by labkit's engine on SmolLM2-135M-Instruct (labkit/engine/lora.py, lora_slots.py).

    .venv/bin/python benchmarks/lora.py [--requests 32] [--prompt-tokens 64] [--new-tokens 32]
        [--rounds 2] [--threads N]

Throughput: one workload (`requests` held-out Austen prompts of `prompt-tokens` tokens, `new-tokens` greedy
tokens each, all queued at once, max_num_seqs = requests) run by the base model alone, and with the requests
spread round-robin over 1, 2 and 4 adapters, so every step mixes them. Every run is eager: a step with an
adapter in it never runs compiled (model_runner.py), so the base runs eagerly too, to compare kernels with
kernels (a compiled base decodes faster still; not measured here). Runs alternate over `rounds`, best kept.
Equality: each adapter's requests, in the 4-adapter mixed batch, against the peft-merged model (W + s B A)
run alone through the same engine: identical greedy tokens, or a first difference that is a near-tie (each
run's token in the other's top 5, and the top-2 margin there within twice the largest logprob gap the two
runs show on their common prefixes: the kernels' own measured error; labkit/numerics.py).
Memory: the base model plus 4 adapters (their host copies and the engine's slots) against 4 merged copies.
Targets:
  - 4 adapters mixed in every batch >= 0.8x the base model's tokens/s on the same workload;
  - every adapter's greedy output identical to its merged model's, or each difference a near-tie.
Every number is measured in this run. Writes results/lora.json and the record benchmarks/results/lora.json.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.data import heldout_ids
from labkit.engine import LLMEngine, SamplingParams
from labkit.lora_train import ADAPTERS_DIR, TASKS
from labkit.numerics import Trace, compare, logprobs_close
from labkit.results import save_record

TOP = 5  # logprobs kept per token for the near-tie judgement


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    stream = heldout_ids(tokenizer, 16384).tolist()
    return [stream[i * length : (i + 1) * length] for i in range(n)]


def run(engine: LLMEngine, work: list[list[int]], loras: list[str | None], params) -> tuple:
    """All requests at once; (seconds, generated tokens, request index -> Trace)."""
    for i, (ids, lora) in enumerate(zip(work, loras)):
        engine.add_request(str(i), ids, params, lora=lora)
    traces = {i: Trace([], []) for i in range(len(work))}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            trace = traces[int(out.request_id)]
            trace.tokens += out.new_token_ids
            trace.top += [dict(lp.top) for lp in out.logprobs or []]
    seconds = time.perf_counter() - start
    return seconds, sum(len(t.tokens) for t in traces.values()), traces


def throughput(model, tok, work, names: list[str], rounds: int, new_tokens: int) -> dict:
    """tokens/s of the base alone and of 1, 2, 4 adapters mixed, best of `rounds` (runs alternate)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    mixes = {"base": []} | {f"{k}_adapters": names[:k] for k in (1, 2, 4)}
    best = dict.fromkeys(mixes, 0.0)
    for _ in range(rounds):
        for label, mix in mixes.items():
            engine = make_engine(model, tok, len(work), mix)
            loras = [mix[i % len(mix)] if mix else None for i in range(len(work))]
            seconds, tokens, _ = run(engine, work, loras, params)
            best[label] = max(best[label], tokens / seconds)
            print(f"{label}: {tokens / seconds:.1f} tok/s", flush=True)
    return {"tokens_per_s": best, "ratio_4_adapters_vs_base": best["4_adapters"] / best["base"]}


def make_engine(model, tok, batch: int, adapters: list[str]) -> LLMEngine:
    engine = LLMEngine(
        model,
        tok,
        max_num_seqs=batch,
        enforce_eager=True,
        enable_lora=bool(adapters),
        max_loras=max(len(adapters), 1),
        max_lora_rank=8,
    )
    for name in adapters:
        engine.add_lora(name, ADAPTERS_DIR / name)
    return engine


def equality(model, tok, work, names: list[str], new_tokens: int) -> dict:
    """Each adapter's requests in one 4-adapter mixed batch vs its merged model alone."""
    from peft import PeftModel  # the reference only: the engine reads the adapters itself

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=TOP)
    loras = [names[i % len(names)] for i in range(len(work))]
    _, _, mixed = run(make_engine(model, tok, len(work), names), work, loras, params)
    out = {}
    for name in names:
        merged = PeftModel.from_pretrained(copy.deepcopy(model), str(ADAPTERS_DIR / name))
        merged = merged.merge_and_unload()
        mine = [i for i, lora in enumerate(loras) if lora == name]
        _, _, ref = run(
            make_engine(merged, tok, len(mine), []),
            [work[i] for i in mine],
            [None] * len(mine),
            params,
        )
        diffs = [compare(mixed[i], ref[j]) for j, i in enumerate(mine)]
        error = max(d.max_logprob_gap for d in diffs)
        differences = [
            {
                "request": i,
                "first_divergence": d.first_divergence,
                "margins": d.margins,
                "near_tie": logprobs_close(mixed[i], ref[j]) and min(d.margins) <= 2 * error,
            }
            for j, (i, d) in enumerate(zip(mine, diffs))
            if d.first_divergence is not None and d.margins is not None
        ]
        out[name] = {
            "requests": len(mine),
            "identical": len(mine) - len(differences),
            "max_logprob_gap_on_common_prefix": error,
            "differences": differences,
        }
        print(name, out[name]["identical"], "of", len(mine), "identical", flush=True)
    return out


def memory(model, tok, names: list[str]) -> dict:
    engine = make_engine(model, tok, 1, names)
    base = sum(p.nbytes for p in model.parameters())
    adapters = sum(a.nbytes for a in engine.adapters.values())
    slots = engine.loras.nbytes if engine.loras else 0
    return {
        "base_model_bytes": base,
        "adapter_bytes": {n: a.nbytes for n, a in engine.adapters.items()},
        "slot_bytes": slots,
        "base_plus_4_adapters_bytes": base + adapters + slots,
        "four_merged_copies_bytes": 4 * base,
        "saving": 4 * base / (base + adapters + slots),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = sorted(TASKS)
    missing = [n for n in names if not (ADAPTERS_DIR / n / "adapter_config.json").exists()]
    if missing:
        raise SystemExit(
            f"adapters {missing} are missing under {ADAPTERS_DIR}: run make lora-adapters"
        )
    model, tok = load_model("smollm2")
    work = prompts(tok, args.requests, args.prompt_tokens)
    speed = throughput(model, tok, work, names, args.rounds, args.new_tokens)
    same = equality(model, tok, work, names, args.new_tokens)
    mem = memory(model, tok, names)
    targets = {
        "4 adapters mixed in every batch >= 0.8x the base model's tokens/s": speed[
            "ratio_4_adapters_vs_base"
        ]
        >= 0.8,
        "each adapter's greedy output = its merged model's, or a near-tie": all(
            all(d["near_tie"] for d in s["differences"]) for s in same.values()
        ),
    }
    figures = {"throughput": speed, "equality": same, "memory": mem}
    path = save_record(
        "lora",
        figures,
        targets,
        workload={
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "adapters": names,
            "engine": "eager, max_num_seqs = requests",
        },
    )
    print(
        f"4 adapters vs base: {speed['ratio_4_adapters_vs_base']:.2f}x; memory saving {mem['saving']:.2f}x"
    )
    print(targets, "->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
