"""Quantization benchmark: RTN / GPTQ / AWQ / INT8 on SmolLM2-135M-Instruct, and labkit vs the libraries.

    .venv/bin/python benchmarks/quant.py                   # SmolLM2 (make setup provides it), ~the core grid
    .venv/bin/python benchmarks/quant.py --model course    # the Austen model
    .venv/bin/python benchmarks/quant.py --full            # + 3-bit per-channel, AWQ 3-bit, torch.ao, head

Every recipe is measured against the unquantized model on the same held-out tokens, after the same
calibration windows: perplexity, KL and top-1 agreement (labkit.evaluate), multiple-choice accuracy on
data/eval/austen_mc.jsonl and chat answers compared token for token with the reference's
(labkit.quality). Then labkit's GPTQ vs GPTQModel's and llm-compressor's on identical settings.
Targets are ratios of perplexity *increase* over the reference, measured in this one run:
GPTQ <= 0.30x RTN's at 4-bit per-channel and at 3-bit g64; AWQ <= 0.50x RTN's at 4-bit g64; labkit's
GPTQ no worse than each library's; INT8 per-channel weights within 1% of the reference.

SmolLM2's "reference" is the float32 dequantization of the Q4_1/Q8_0 GGUF it is distributed as (see
labkit/smollm2.py). Default sizes keep a run on 2 CPU cores to tens of minutes: 2,048 held-out
tokens (windows of 512), 16 calibration windows of 256 tokens, 120 multiple-choice items, 8 chats.
Writes results/quant.json and the committed record benchmarks/results/quant.json.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labkit import load_model  # noqa: E402
from labkit.data import calibration_batches, heldout_ids  # noqa: E402
from labkit.evaluate import disk_bytes, evaluate_lm, saved_bytes  # noqa: E402
from labkit.quality import chat_answers, quality  # noqa: E402
from labkit.quant import (  # noqa: E402
    GPTQOptions,
    QuantScheme,
    awq_quantize_model,
    export_gptq,
    gptq_quantize_model,
    load_gptq,
    rtn_quantize_model,
)
from labkit.quant.export import gptq_state_dict  # noqa: E402
from labkit.quant.libs import libraries_available, run_library  # noqa: E402
from labkit.quant.ptq import dynamic_int8, static_int8  # noqa: E402
from labkit.quant.reference import ReferenceLogits  # noqa: E402
from labkit.quant.walk import get_weight, valid_group_sizes  # noqa: E402
from labkit.results import save_record  # noqa: E402

# GPTQ as the paper's code runs it: act-order, groups in quantization order, true-sequential
GPTQ = dict(act_order=True, static_groups=False, true_sequential=True)
# labkit vs library: (label, labkit's GPTQ settings, library task, the library's settings)
LIBRARY_PAIRS = [
    (
        "act-order, static groups, one calibration pass per block",
        dict(act_order=True, static_groups=True, true_sequential=False),
        "llmcompressor-gptq",
        dict(act_order=True, static_groups=True),
    ),
    (
        "act-order, static groups, true-sequential",
        dict(act_order=True, static_groups=True, true_sequential=True),
        "gptqmodel-gptq",
        dict(act_order=True, static_groups=True, true_sequential=True),
    ),
]
AWQ_TASKS = ["gptqmodel-awq", "llmcompressor-awq"]


def grid(gs: int, full: bool) -> list[tuple[str, int, int, bool]]:
    """(method, bits, group size, head) of every recipe: the targets' rows, or everything."""
    rows = [
        ("rtn", 4, -1, False),
        ("gptq", 4, -1, False),
        ("rtn", 4, gs, False),
        ("gptq", 4, gs, False),
        ("awq", 4, gs, False),
        ("rtn", 3, gs, False),
        ("gptq", 3, gs, False),
    ]
    if full:
        rows += [("awq", 3, gs, False), ("rtn", 3, -1, False), ("gptq", 3, -1, False)]
        rows += [(m, b, g, True) for m, b, g, _ in rows]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), course, or any model")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens; 0 = all")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="every recipe, torch.ao and the head too")
    ap.add_argument(
        "--libraries",
        default="gptq",
        help="'gptq' (default), 'all', 'none' or task names, comma-separated",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device="cpu")
    ids = heldout_ids(tok, a.eval_tokens or None)
    ref = ReferenceLogits(model)
    calib = calibration_batches(tok, a.calib_samples, a.seq_len, seed=0)
    gs = max(valid_group_sizes(model), default=-1)  # SmolLM2: 64 (576 is not a multiple of 128)
    work = Path(tempfile.mkdtemp(prefix="labkit-quant-bench-"))

    reference_answers = chat_answers(model, tok)
    fp32 = {**evaluate_lm(model, ids, reference=ref), **quality(model, tok, reference_answers)}
    rows = [dict(method="fp32", bits=32, group_size=0, head=False, **fp32, quant_seconds=0.0)]
    print(
        f"reference: {fmt(fp32)}; {fp32['tokens']} held-out tokens, calibration {tuple(calib.shape)}",
        flush=True,
    )

    def add(method, bits, group_size, head, qmodel, seconds, size):
        r = {**evaluate_lm(qmodel, ids, reference=ref), **quality(qmodel, tok, reference_answers)}
        rows.append(
            dict(
                method=method,
                bits=bits,
                group_size=group_size,
                head=head,
                **r,
                disk_bytes=size,
                quant_seconds=seconds,
            )
        )
        print(
            f"{method:22s} {bits}-bit g{group_size:<3d} head={head!s:5s} {fmt(r)} {seconds:.0f}s",
            flush=True,
        )

    def packed_size(m, results) -> int:
        return sum(t.numel() * t.element_size() for t in gptq_state_dict(m, results).values())

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = rtn_quantize_model(m, QuantScheme(8, granularity="channel"))
    add("rtn-int8", 8, -1, False, m, time.perf_counter() - t0, packed_size(m, res))
    if a.full:
        for name, fn in (
            ("torch.ao-dynamic-int8", lambda: dynamic_int8(model)),
            ("torch.ao-static-int8", lambda: static_int8(model, calib, progress=False)),
        ):
            t0 = time.perf_counter()
            q = fn()
            add(name, 8, -1, False, q, time.perf_counter() - t0, saved_bytes(q))

    def gptq(m, b, g, h):
        scheme, options = gptq_recipe(b, g, GPTQ)
        return gptq_quantize_model(
            m, calib, scheme, options=options, include_head=h, progress=False
        )

    methods = {
        "rtn": lambda m, b, g, h: rtn_quantize_model(m, QuantScheme(b, g), include_head=h),
        "gptq": gptq,
        "awq": lambda m, b, g, h: awq_quantize_model(
            m, calib, QuantScheme(b, g), include_head=h, progress=False
        ),
    }
    for method, bits, group_size, head in grid(gs, a.full):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = methods[method](m, bits, group_size, head)
        add(method, bits, group_size, head, m, time.perf_counter() - t0, packed_size(m, res))

    size_ratio = linear_size_ratio(model, gs, work)
    libs = compare_with_libraries(a, model, tok, ids, ref, calib, gs, work)

    targets = check_targets(rows, libs, fp32, gs, size_ratio)
    print_tables(rows, libs, fp32, targets)
    figures = {
        "model": a.model,
        "eval_tokens": fp32["tokens"],
        "calibration": [a.calib_samples, a.seq_len],
        "group_size": gs,
        "gptq": GPTQ,
        "fp32": fp32,
        "rows": rows,
        "libraries": libs,
        "linear_size_ratio_4bit": size_ratio,
        "run_seconds": time.perf_counter() - t_start,
    }
    write_record(figures, targets, a)


def fmt(r) -> str:
    kl = f" KL {r['kl']:.4f} top1 {r['top1']:.3f}" if "kl" in r else ""
    return (
        f"ppl {r['perplexity']:.3f}{kl} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} "
        f"chat same {r['chat_same']:.2f} prefix {r['chat_prefix']:.2f}"
    )


def gptq_recipe(bits: int, group_size: int, settings: dict) -> tuple[QuantScheme, GPTQOptions]:
    """A GPTQ settings dict, as the record stores it, as labkit's objects: act_order is part of the
    scheme, the rest (static_groups, true_sequential) are GPTQ's options."""
    rest = dict(settings)
    scheme = QuantScheme(bits, group_size, act_order=rest.pop("act_order", False))
    return scheme, GPTQOptions(**rest)


def linear_size_ratio(model, gs, work) -> float:
    """The decoder blocks' linear weights on disk: float32 vs packed 4-bit (codes, scales, zeros)."""
    m = copy.deepcopy(model)
    res = rtn_quantize_model(m, QuantScheme(4, gs))
    fp32 = {f"{n}.weight": get_weight(model.get_submodule(n)).detach().contiguous() for n in res}
    save_file(fp32, work / "linears_fp32.safetensors")
    packed = {
        k: v
        for k, v in gptq_state_dict(m, res).items()
        if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")
    }
    save_file(packed, work / "linears_packed.safetensors")
    return disk_bytes(work / "linears_fp32.safetensors") / disk_bytes(
        work / "linears_packed.safetensors"
    )


def compare_with_libraries(a, model, tok, ids, ref, calib, gs, work) -> list[dict]:
    """labkit's GPTQ (through its own export + load_gptq) and each library's, on identical settings:
    4-bit, group size gs, symmetric, min-max scales, damp 0.01, block 128, decoder blocks only, the
    same calibration windows and held-out tokens."""
    if a.libraries == "none":
        return []
    tasks = {
        "gptq": [p[2] for p in LIBRARY_PAIRS],
        "all": [p[2] for p in LIBRARY_PAIRS] + AWQ_TASKS,
    }
    tasks = tasks.get(a.libraries, a.libraries.split(","))
    if not libraries_available():
        print("libraries skipped: .venv-quant missing (make quant-libs)")
        tasks = []
    common = dict(
        model=a.model,
        bits=4,
        group_size=gs,
        n_samples=a.calib_samples,
        seq_len=a.seq_len,
        eval_tokens=len(ids),
        damp=0.01,
    )
    libs = []

    def library(task, settings, **options):
        try:
            out = run_library(task, out=work / task, **common, **options)
            if "perplexity" not in out:  # a GPTQ checkpoint: evaluate it here with labkit's loader
                lm, _ = load_gptq(out["path"], device="cpu")
                out.update(evaluate_lm(lm, ids, reference=ref))
            libs.append(
                dict(
                    who=out["library"],
                    settings=settings,
                    **{k: v for k, v in out.items() if k != "library"},
                )
            )
            print(f"{task}: ppl {out['perplexity']:.3f} KL {out['kl']:.5f}", flush=True)
        except Exception as err:
            print(f"{task} FAILED: {str(err)[-1500:]}", flush=True)
            libs.append(
                dict(
                    who=task, method=task.split("-")[-1], settings=settings, error=str(err)[-1500:]
                )
            )

    for label, ours, task, theirs in LIBRARY_PAIRS:
        if task not in tasks:
            continue
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        scheme, options = gptq_recipe(4, gs, ours)  # (damp 0.01, blocks of 128: the defaults)
        res = gptq_quantize_model(m, calib, scheme, options=options, progress=False)
        sec = time.perf_counter() - t0
        export = export_gptq(m, res, work / f"labkit-{task}", tok, options)
        loaded, _ = load_gptq(export, device="cpu")
        libs.append(
            dict(
                who="labkit",
                method="gptq",
                settings=label,
                pair=task,
                quant_seconds=sec,
                **evaluate_lm(loaded, ids, reference=ref),
            )
        )
        library(task, label, **theirs)
    for task in AWQ_TASKS:
        if task in tasks:
            library(task, "the library's AWQ defaults")
    return libs


def check_targets(rows, libs, fp32, gs, size_ratio) -> list[dict]:
    def row(method, bits, group_size):
        return next(
            r
            for r in rows
            if (r["method"], r["bits"], r["group_size"], r["head"])
            == (method, bits, group_size, False)
        )

    increase = lambda r: r["perplexity"] - fp32["perplexity"]  # noqa: E731
    targets = []

    def target(name, value, limit, ok, kl_ratio=None):
        targets.append(dict(target=name, value=value, limit=limit, met=bool(ok), kl_ratio=kl_ratio))

    int8 = row("rtn-int8", 8, -1)["perplexity"] / fp32["perplexity"] - 1
    target(
        "INT8 per-channel weights: ppl within 1% of the reference", int8, 0.01, abs(int8) <= 0.01
    )
    for method, bits, group_size, limit in (
        ("gptq", 4, -1, 0.3),
        ("gptq", 3, gs, 0.3),
        ("awq", 4, gs, 0.5),
    ):
        ours, rtn = row(method, bits, group_size), row("rtn", bits, group_size)
        ratio = increase(ours) / max(increase(rtn), 1e-9)
        where = "per-channel" if group_size == -1 else f"g{group_size}"
        target(
            f"{method.upper()} {bits}-bit {where}: ppl increase <= {limit}x RTN's",
            ratio,
            limit,
            ratio <= limit,
            kl_ratio=ours["kl"] / rtn["kl"],
        )
    for r in libs:
        if r["who"] != "labkit" and r.get("method") == "gptq" and "error" not in r:
            ours = next(o for o in libs if o["who"] == "labkit" and o["settings"] == r["settings"])
            target(
                f"labkit GPTQ ppl <= {r['who']}'s ({r['settings']})",
                ours["perplexity"] - r["perplexity"],
                0.0,
                ours["perplexity"] <= r["perplexity"],
                kl_ratio=ours["kl"] / r["kl"],
            )
    target(
        f"packed 4-bit g{gs} linear weights >= 7.2x smaller than fp32 on disk",
        size_ratio,
        7.2,
        size_ratio >= 7.2,
    )
    return targets


def print_tables(rows, libs, fp32, targets):
    print(
        f"\n{'method':22s} {'bits':>4s} {'group':>5s} {'head':>4s} {'ppl':>9s} {'Δppl':>8s} {'KL':>7s} "
        f"{'top-1':>6s} {'acc':>6s} {'acc_n':>6s} {'chat=':>5s} {'size':>9s} {'quant s':>7s}"
    )
    for r in rows:
        print(
            f"{r['method']:22s} {r['bits']:4d} {r['group_size']:5d} {'q' if r['head'] else 'fp':>4s} "
            f"{r['perplexity']:9.3f} {r['perplexity'] - fp32['perplexity']:+8.3f} {r['kl']:7.4f} "
            f"{r['top1']:6.3f} {r['acc']:6.3f} {r['acc_norm']:6.3f} {r['chat_same']:5.2f} "
            f"{r.get('disk_bytes', 0) / 2**20:7.1f}Mi {r['quant_seconds']:7.0f}"
        )
    if libs:
        print(
            f"\n{'who':24s} {'method':6s} {'ppl':>9s} {'Δppl':>8s} {'KL':>8s} {'top-1':>6s}  settings"
        )
    for r in libs:
        if "error" in r:
            print(f"{r['who']:24s} {r['method']:6s} FAILED  {r['settings']}")
        else:
            print(
                f"{r['who']:24s} {r['method']:6s} {r['perplexity']:9.3f} "
                f"{r['perplexity'] - fp32['perplexity']:+8.3f} {r['kl']:8.5f} {r['top1']:6.3f}  {r['settings']}"
            )
    print()
    for t in targets:
        kl = f", KL ratio {t['kl_ratio']:.3f}" if t["kl_ratio"] is not None else ""
        print(
            f"[{'PASS' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.4g} (limit {t['limit']}){kl}"
        )


def write_record(figures, targets, a):
    """benchmarks/results/quant.json, committed so the README can cite the latest run."""
    targets_met = {t["target"]: t["met"] for t in targets}
    print("wrote", save_record("quant", figures, targets_met, settings=vars(a), targets=targets))


if __name__ == "__main__":
    main()
