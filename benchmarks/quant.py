"""Quantization benchmark: every method and bit width on the course model, and labkit vs the libraries.

    .venv/bin/python benchmarks/quant.py [--eval-tokens 8192 --calib-samples 64 --libraries all]

Writes results/quant.json (decoder blocks quantized, the output/embedding matrix kept in float16 as
GPTQModel, llm-compressor and vLLM do by default; --include-head quantizes it too and writes
results/quant_head.json) and prints a table: perplexity, KL and top-1 agreement vs fp32, size (packed
codes + float16 for the rest), decode tokens/s (packed QuantLinear model, plain PyTorch) and quantization
time; then the course's targets (ratios measured within this one run) with PASS/MISS.
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

from labkit import load_model  # noqa: E402
from labkit.data import calibration_batches, heldout_ids  # noqa: E402
from labkit.evaluate import disk_bytes, evaluate_lm, format_bytes, saved_bytes  # noqa: E402
from labkit.quant import (awq_quantize_model, export_gptq, gptq_quantize_model, load_gptq, pack_model,  # noqa: E402
                          rtn_quantize_model)
from labkit.quant.export import gptq_state_dict  # noqa: E402
from labkit.quant.libs import libraries_available, run_library  # noqa: E402
from labkit.quant.ptq import dynamic_int8, static_int8  # noqa: E402
from labkit.quant.walk import find_blocks, find_linears, get_weight  # noqa: E402
from labkit.results import save_result  # noqa: E402
from labkit.timing import decode_tokens_per_second  # noqa: E402

LIBRARY_TASKS = ["gptqmodel-gptq", "llmcompressor-gptq", "gptqmodel-awq"]


def packed_size(model, results) -> int:
    """Bytes of a checkpoint holding packed codes for `results` and float16 for everything else."""
    head_quantized = [n for n in results if n not in dict(find_linears(find_blocks(model)[1], find_blocks(model)[0] + "."))]
    blocks_only = {n: q for n, q in results.items() if n not in head_quantized}
    state = gptq_state_dict(model, blocks_only)
    total = sum(t.numel() * t.element_size() for t in state.values())
    for name in head_quantized:  # a quantized tied head replaces the float16 embedding/head matrix
        qw = results[name]
        total -= qw.q.numel() * 2
        total += qw.q.numel() * qw.bits // 8 + qw.scale.numel() * 2 + (0 if qw.symmetric else qw.zero.numel() * qw.bits / 8)
    return int(total)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--include-head", action="store_true",
                    help="also quantize the tied output/embedding matrix (writes results/quant_head.json)")
    ap.add_argument("--libraries", default="all", help="comma-separated lib_runner tasks, 'all' or 'none'")
    ap.add_argument("--decode-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    include_head = a.include_head
    torch.manual_seed(0)
    model, tok = load_model(a.model, device="cpu")
    ids = heldout_ids(tok, a.eval_tokens)
    calib = calibration_batches(tok, a.calib_samples, a.seq_len, seed=0)
    gs = 128 if all(get_weight(m).shape[1] % 128 == 0 for b in find_blocks(model)[1] for m in find_linears(b).values()) else -1
    work = Path(tempfile.mkdtemp(prefix="labkit-quant-bench-"))
    speed = lambda m: decode_tokens_per_second(m, tok, new_tokens=a.decode_tokens, runs=2)  # noqa: E731

    rows = []
    fp32 = evaluate_lm(model, ids)
    model.save_pretrained(work / "fp32")
    rows.append(dict(method="fp32", bits=32, group_size=0, head=False, **fp32, kl=0.0, top1=1.0,
                     disk_bytes=disk_bytes(work / "fp32" / "model.safetensors"), decode_tok_s=speed(model), quant_seconds=0.0))
    print(f"fp32: ppl {fp32['perplexity']:.3f}", flush=True)

    def add(method, bits, group_size, head, qmodel, seconds, size, packed_model):
        r = evaluate_lm(qmodel, ids, reference=model)
        rows.append(dict(method=method, bits=bits, group_size=group_size, head=head, **r, disk_bytes=size,
                         decode_tok_s=speed(packed_model), quant_seconds=seconds))
        print(f"{method:22s} {bits}-bit g{group_size:<4d} head={head!s:5s} ppl {r['perplexity']:.3f} KL {r['kl']:.5f} "
              f"top1 {r['top1']:.4f} {seconds:.1f}s", flush=True)

    # INT8
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = rtn_quantize_model(m, 8, -1, granularity="channel")
    sec = time.perf_counter() - t0
    add("rtn-int8", 8, -1, False, m, sec, packed_size(m, res), pack_model(copy.deepcopy(m), res))
    for name, fn in (("torch.ao-dynamic-int8", lambda: dynamic_int8(model)), ("torch.ao-static-int8", lambda: static_int8(model, calib, progress=False))):
        t0 = time.perf_counter()
        q = fn()
        sec = time.perf_counter() - t0
        add(name, 8, -1, False, q, sec, saved_bytes(q), q)

    # 4/3-bit grid
    methods = {"rtn": lambda m, b, g, h: rtn_quantize_model(m, b, g, include_head=h),
               "gptq": lambda m, b, g, h: gptq_quantize_model(m, calib, b, g, act_order=True, include_head=h, progress=False),
               "awq": lambda m, b, g, h: awq_quantize_model(m, calib, b, g, include_head=h, progress=False)}
    for bits in (4, 3):
        for group_size in (gs, -1):
            for method, fn in methods.items():
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                res = fn(m, bits, group_size, include_head)
                sec = time.perf_counter() - t0
                add(method, bits, group_size, include_head, m, sec, packed_size(m, res), pack_model(copy.deepcopy(m), res))

    # packed size target: the decoder blocks' linear weights, fp32 file vs packed 4-bit g128 file
    m = copy.deepcopy(model)
    res = rtn_quantize_model(m, 4, gs)
    linear_fp32 = {f"{n}.weight": get_weight(m_).detach().contiguous() for n, m_ in
                   ((n, model.get_submodule(n)) for n in res)}
    save_file(linear_fp32, work / "linears_fp32.safetensors")
    state = gptq_state_dict(m, res)
    save_file({k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")},
              work / "linears_packed.safetensors")
    size_ratio = disk_bytes(work / "linears_fp32.safetensors") / disk_bytes(work / "linears_packed.safetensors")

    # labkit vs the libraries: GPTQ 4-bit g128, decoder blocks only, same calibration windows, no act-order
    libs = []
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = gptq_quantize_model(m, calib, 4, gs, progress=False)
    sec = time.perf_counter() - t0
    export_dir = export_gptq(m, res, work / "labkit-gptq", tok)
    loaded, _ = load_gptq(export_dir, device="cpu")
    libs.append(dict(who="labkit", method="gptq", quant_seconds=sec, **evaluate_lm(loaded, ids, reference=model)))
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    awq_quantize_model(m, calib, 4, gs, progress=False)
    libs.append(dict(who="labkit", method="awq", quant_seconds=time.perf_counter() - t0, **evaluate_lm(m, ids, reference=model)))
    tasks = [] if a.libraries == "none" else (LIBRARY_TASKS if a.libraries == "all" else a.libraries.split(","))
    if tasks and not libraries_available():
        print("libraries skipped: .venv-quant missing (make quant-libs)")
        tasks = []
    for task in tasks:
        try:
            out = run_library(task, model=a.model, bits=4, group_size=gs, n_samples=a.calib_samples, seq_len=a.seq_len,
                              eval_tokens=a.eval_tokens, out=work / task)
            if "perplexity" not in out:
                lm, _ = load_gptq(out["path"], device="cpu")
                out.update(evaluate_lm(lm, ids, reference=model))
            libs.append(dict(who=out["library"], **{k: v for k, v in out.items() if k != "library"}))
            print(f"{task}: ppl {out['perplexity']:.3f} KL {out['kl']:.5f}", flush=True)
        except Exception as err:
            print(f"{task} FAILED: {str(err)[-1500:]}", flush=True)
            libs.append(dict(who=task, method=task.split("-")[-1], error=str(err)[-1500:]))

    # report
    print(f"\n{'method':22s} {'bits':>4s} {'group':>6s} {'ppl':>9s} {'Δppl':>8s} {'KL':>9s} {'top-1':>7s} "
          f"{'size':>10s} {'tok/s':>7s} {'quant s':>8s}")
    for r in rows:
        print(f"{r['method']:22s} {r['bits']:4d} {r['group_size']:6d} {r['perplexity']:9.3f} "
              f"{r['perplexity'] - fp32['perplexity']:+8.3f} {r['kl']:9.5f} {r['top1']:7.4f} "
              f"{format_bytes(r['disk_bytes']):>10s} {r['decode_tok_s']:7.1f} {r['quant_seconds']:8.1f}")
    print(f"\n{'who':24s} {'method':6s} {'ppl':>9s} {'KL':>9s} {'top-1':>7s} {'quant s':>8s}")
    for r in libs:
        if "error" in r:
            print(f"{r['who']:24s} {r['method']:6s} FAILED")
        else:
            print(f"{r['who']:24s} {r['method']:6s} {r['perplexity']:9.3f} {r['kl']:9.5f} {r['top1']:7.4f} {r['quant_seconds']:8.1f}")

    def row(method, bits, group_size):
        return next(r for r in rows if r["method"] == method and r["bits"] == bits and r["group_size"] == group_size)

    inc = lambda r: r["perplexity"] - fp32["perplexity"]  # noqa: E731
    targets = []

    def target(name, value, limit, ok):
        targets.append(dict(target=name, value=value, limit=limit, met=bool(ok)))

    target("INT8 per-channel ppl within 1% of fp32", row("rtn-int8", 8, -1)["perplexity"] / fp32["perplexity"] - 1, 0.01,
           abs(row("rtn-int8", 8, -1)["perplexity"] / fp32["perplexity"] - 1) <= 0.01)
    for bits, limit in ((4, 0.3), (3, 0.4)):
        for group_size in (gs, -1):
            ratio = inc(row("gptq", bits, group_size)) / max(inc(row("rtn", bits, group_size)), 1e-9)
            target(f"GPTQ {bits}-bit g{group_size} Δppl <= {limit} x RTN's", ratio, limit, ratio <= limit)
    ratio = inc(row("awq", 4, gs)) / max(inc(row("rtn", 4, gs)), 1e-9)
    target(f"AWQ 4-bit g{gs} Δppl <= 0.5 x RTN's", ratio, 0.5, ratio <= 0.5)
    lib_gptq = [r for r in libs if r["who"] != "labkit" and r.get("method") == "gptq" and "error" not in r]
    ours = next(r for r in libs if r["who"] == "labkit" and r["method"] == "gptq")
    for r in lib_gptq:
        target(f"labkit GPTQ ppl <= {r['who']}'s", ours["perplexity"] - r["perplexity"], 0.0, ours["perplexity"] <= r["perplexity"])
    target(f"packed 4-bit g{gs} linear weights >= 7.2x smaller than fp32 on disk", size_ratio, 7.2, size_ratio >= 7.2)
    print()
    for t in targets:
        print(f"[{'PASS' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.4g} (limit {t['limit']})")
    path = save_result("quant_head" if include_head else "quant", {"model": a.model or "course", "eval_tokens": a.eval_tokens,
                                 "calibration": [a.calib_samples, a.seq_len], "head_quantized": include_head,
                                 "fp32": fp32, "rows": rows, "libraries": libs, "targets": targets,
                                 "linear_size_ratio_4bit": size_ratio})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
