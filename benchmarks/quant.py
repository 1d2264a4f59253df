"""Quantization benchmark: every method and bit width on the course model, and labkit vs the libraries.

    .venv/bin/python benchmarks/quant.py [--eval-tokens 0 --calib-samples 32 --libraries all --threads 1]

Writes results/quant.json and prints two tables. (1) Every method, bit width and granularity, first
with the decoder blocks quantized and the tied output/embedding matrix kept in float16 (what GPTQModel,
llm-compressor and vLLM do by default), then with the output head quantized too (untied: the embedding
lookup keeps float16 weights, see labkit.quant.walk.untie_output_head): perplexity on the whole held-out
split (55k tokens by default), KL and top-1 agreement vs fp32, size (packed codes + float16 for the
rest), decode tokens/s (packed QuantLinear model, plain PyTorch) and quantization time. (2) labkit vs
GPTQModel and llm-compressor with the same settings on both sides, stated in the table. Then the course's
targets, as ratios measured within this one run, with PASS/MISS.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.data import calibration_batches, heldout_ids
from labkit.evaluate import disk_bytes, evaluate_lm, format_bytes, saved_bytes
from labkit.quant import (
    awq_quantize_model,
    export_gptq,
    gptq_quantize_model,
    load_gptq,
    pack_model,
    rtn_quantize_model,
)
from labkit.quant.export import gptq_state_dict
from labkit.quant.libs import libraries_available, run_library
from labkit.quant.ptq import dynamic_int8, static_int8
from labkit.quant.reference import ReferenceLogits
from labkit.quant.walk import find_blocks, find_linears, get_weight
from labkit.results import save_result
from labkit.timing import decode_tokens_per_second

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


def packed_size(model, results) -> int:
    """Bytes of a GPTQ-style checkpoint: packed codes for `results`, float16 for everything else."""
    return sum(t.numel() * t.element_size() for t in gptq_state_dict(model, results).values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--eval-tokens", type=int, default=0, help="held-out tokens to evaluate on; 0 = all"
    )
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--no-head", action="store_true", help="skip the runs that also quantize the output head"
    )
    ap.add_argument(
        "--libraries", default="all", help="'all', 'none' or comma-separated library tasks"
    )
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)"
    )
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device="cpu")
    ids = heldout_ids(tok, a.eval_tokens or None)
    ref = ReferenceLogits(model)
    calib = calibration_batches(tok, a.calib_samples, a.seq_len, seed=0)
    gs = (
        128
        if all(
            get_weight(m).shape[1] % 128 == 0
            for b in find_blocks(model)[1]
            for m in find_linears(b).values()
        )
        else -1
    )
    work = Path(tempfile.mkdtemp(prefix="labkit-quant-bench-"))

    def speed(m):
        return decode_tokens_per_second(m, tok, new_tokens=a.decode_tokens, runs=2)

    rows = []
    fp32 = evaluate_lm(model, ids, reference=ref)
    model.save_pretrained(work / "fp32")
    rows.append(
        dict(
            method="fp32",
            bits=32,
            group_size=0,
            head=False,
            **fp32,
            disk_bytes=disk_bytes(work / "fp32" / "model.safetensors"),
            decode_tok_s=speed(model),
            quant_seconds=0.0,
        )
    )
    print(
        f"fp32: ppl {fp32['perplexity']:.3f} on {fp32['tokens']} held-out tokens; calibration {tuple(calib.shape)}",
        flush=True,
    )

    def add(method, bits, group_size, head, qmodel, seconds, size, packed_model):
        r = evaluate_lm(qmodel, ids, reference=ref)
        rows.append(
            dict(
                method=method,
                bits=bits,
                group_size=group_size,
                head=head,
                **r,
                disk_bytes=size,
                decode_tok_s=speed(packed_model),
                quant_seconds=seconds,
            )
        )
        print(
            f"{method:22s} {bits}-bit g{group_size:<4d} head={head!s:5s} ppl {r['perplexity']:.3f} KL {r['kl']:.5f} "
            f"top1 {r['top1']:.4f} {seconds:.1f}s",
            flush=True,
        )

    # INT8
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = rtn_quantize_model(m, 8, -1, granularity="channel")
    sec = time.perf_counter() - t0
    add("rtn-int8", 8, -1, False, m, sec, packed_size(m, res), pack_model(copy.deepcopy(m), res))
    for name, fn in (
        ("torch.ao-dynamic-int8", lambda: dynamic_int8(model)),
        ("torch.ao-static-int8", lambda: static_int8(model, calib, progress=False)),
    ):
        t0 = time.perf_counter()
        q = fn()
        sec = time.perf_counter() - t0
        add(name, 8, -1, False, q, sec, saved_bytes(q), q)

    # 4/3-bit grid, blocks only, then with the (untied) output head
    methods = {
        "rtn": lambda m, b, g, h: rtn_quantize_model(m, b, g, include_head=h),
        "gptq": lambda m, b, g, h: gptq_quantize_model(
            m, calib, b, g, include_head=h, progress=False, **GPTQ
        ),
        "awq": lambda m, b, g, h: awq_quantize_model(
            m, calib, b, g, include_head=h, progress=False
        ),
    }
    for head in (False,) if a.no_head else (False, True):
        for bits in (4, 3):
            for group_size in (gs, -1):
                for method, fn in methods.items():
                    m = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    res = fn(m, bits, group_size, head)
                    sec = time.perf_counter() - t0
                    add(
                        method,
                        bits,
                        group_size,
                        head,
                        m,
                        sec,
                        packed_size(m, res),
                        pack_model(copy.deepcopy(m), res),
                    )

    # packed size target: the decoder blocks' linear weights, fp32 file vs packed 4-bit g128 file
    m = copy.deepcopy(model)
    res = rtn_quantize_model(m, 4, gs)
    linear_fp32 = {
        f"{n}.weight": get_weight(model.get_submodule(n)).detach().contiguous() for n in res
    }
    save_file(linear_fp32, work / "linears_fp32.safetensors")
    state = gptq_state_dict(m, res)
    save_file(
        {
            k: v
            for k, v in state.items()
            if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")
        },
        work / "linears_packed.safetensors",
    )
    size_ratio = disk_bytes(work / "linears_fp32.safetensors") / disk_bytes(
        work / "linears_packed.safetensors"
    )

    # labkit vs the libraries: 4-bit g128, symmetric, min-max scales, damp 0.01, block 128, decoder blocks
    # only, the same calibration windows; labkit's GPTQ goes through its own export + load_gptq
    libs = []
    tasks = (
        []
        if a.libraries == "none"
        else (
            [p[2] for p in LIBRARY_PAIRS] + AWQ_TASKS
            if a.libraries == "all"
            else a.libraries.split(",")
        )
    )
    if tasks and not libraries_available():
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
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = gptq_quantize_model(
            m, calib, 4, gs, damp=0.01, block_size=128, progress=False, **ours
        )
        sec = time.perf_counter() - t0
        loaded, _ = load_gptq(export_gptq(m, res, work / f"labkit-{task}", tok), device="cpu")
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
        if task in tasks:
            library(task, label, **theirs)
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    awq_quantize_model(m, calib, 4, gs, progress=False)
    libs.append(
        dict(
            who="labkit",
            method="awq",
            settings="AWQ: scale search (20-point alpha grid) + clipping search",
            quant_seconds=time.perf_counter() - t0,
            **evaluate_lm(m, ids, reference=ref),
        )
    )
    for task in AWQ_TASKS:
        if task in tasks:
            library(task, "the library's AWQ defaults")

    # report
    print(
        f"\n{'method':22s} {'bits':>4s} {'group':>6s} {'head':>5s} {'ppl':>9s} {'Δppl':>8s} {'KL':>9s} {'top-1':>7s} "
        f"{'size':>10s} {'tok/s':>7s} {'quant s':>8s}"
    )
    for r in rows:
        print(
            f"{r['method']:22s} {r['bits']:4d} {r['group_size']:6d} {'q' if r['head'] else 'fp16':>5s} {r['perplexity']:9.3f} "
            f"{r['perplexity'] - fp32['perplexity']:+8.3f} {r['kl']:9.5f} {r['top1']:7.4f} "
            f"{format_bytes(r['disk_bytes']):>10s} {r['decode_tok_s']:7.1f} {r['quant_seconds']:8.1f}"
        )
    print(
        f"\n{'who':24s} {'method':6s} {'ppl':>9s} {'Δppl':>8s} {'KL':>9s} {'top-1':>7s} {'quant s':>8s}  settings"
    )
    for r in libs:
        if "error" in r:
            print(f"{r['who']:24s} {r['method']:6s} FAILED  {r['settings']}")
        else:
            print(
                f"{r['who']:24s} {r['method']:6s} {r['perplexity']:9.3f} {r['perplexity'] - fp32['perplexity']:+8.3f} "
                f"{r['kl']:9.5f} {r['top1']:7.4f} {r['quant_seconds']:8.1f}  {r['settings']}"
            )

    def row(method, bits, group_size, head=False):
        return next(
            r
            for r in rows
            if r["method"] == method
            and r["bits"] == bits
            and r["group_size"] == group_size
            and r["head"] == head
        )

    def inc(r):
        return r["perplexity"] - fp32["perplexity"]

    targets = []

    def target(name, value, limit, ok, kl_ratio=None):
        targets.append(dict(target=name, value=value, limit=limit, met=bool(ok), kl_ratio=kl_ratio))

    int8 = row("rtn-int8", 8, -1)["perplexity"] / fp32["perplexity"] - 1
    target("INT8 per-channel ppl within 1% of fp32", int8, 0.01, abs(int8) <= 0.01)
    for head in (False,) if a.no_head else (False, True):
        where = " (+ head)" if head else ""
        for method, bits, limit in (("gptq", 4, 0.3), ("gptq", 3, 0.4), ("awq", 4, 0.5)):
            for group_size in (gs, -1) if method == "gptq" else (gs,):
                ours, rtn = row(method, bits, group_size, head), row("rtn", bits, group_size, head)
                ratio = inc(ours) / max(inc(rtn), 1e-9)
                target(
                    f"{method.upper()} {bits}-bit g{group_size}{where} Δppl <= {limit} x RTN's",
                    ratio,
                    limit,
                    ratio <= limit,
                    kl_ratio=ours["kl"] / rtn["kl"],
                )
    for r in libs:
        if r["who"] != "labkit" and r.get("method") == "gptq" and "error" not in r:
            ours = next(
                o for o in libs if o["who"] == "labkit" and o.get("settings") == r["settings"]
            )
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
    print()
    for t in targets:
        kl = f", KL ratio {t['kl_ratio']:.3f}" if t["kl_ratio"] is not None else ""
        print(
            f"[{'PASS' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.4g} (limit {t['limit']}){kl}"
        )
    path = save_result(
        "quant",
        {
            "model": a.model or "course",
            "eval_tokens": fp32["tokens"],
            "threads": a.threads,
            "calibration": [a.calib_samples, a.seq_len],
            "gptq": GPTQ,
            "fp32": fp32,
            "rows": rows,
            "libraries": libs,
            "targets": targets,
            "linear_size_ratio_4bit": size_ratio,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
