"""QAT benchmark on the Austen model: what a short straight-through fine-tune recovers that PTQ cannot.

    .venv/bin/python benchmarks/qat.py [--steps 100] [--bits 3 2] [--group-size 64] [--threads N]

For each bit width: held-out perplexity of the float model, RTN, GPTQ and QAT (fine-tuned through the
quantizer by distillation from the float model, then converted by RTN of the trained weights, so
evaluated along the PTQ path), all on the same held-out tokens. Fixed seeds. Writes results/qat.json and the committed record
benchmarks/results/qat.json. Targets: QAT's perplexity below GPTQ's at 3 and at 2 bits.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import load_model
from labkit.data import calibration_batches, heldout_ids, token_stream
from labkit.evaluate import evaluate_lm
from labkit.quant import QuantScheme, gptq_quantize_model, rtn_quantize_model
from labkit.quant.qat import QATSchedule, convert_qat_model, prepare_qat, train_qat
from labkit.results import save_record


def ppl(model, ids) -> float:
    return round(evaluate_lm(model, ids)["perplexity"], 3)


def one_width(model, tokenizer, ids, bits: int, args) -> dict:
    rtn = copy.deepcopy(model)
    scheme = QuantScheme(bits, args.group_size, symmetric=False)
    rtn_quantize_model(rtn, scheme)
    gptq = copy.deepcopy(model)
    calib = calibration_batches(tokenizer, args.calib_samples, 256, seed=args.seed)
    gptq_quantize_model(gptq, calib, scheme, progress=False)
    qat = prepare_qat(copy.deepcopy(model), scheme)
    start = time.perf_counter()
    schedule = QATSchedule(
        args.steps,
        args.batch,
        args.seq_len,
        args.lr,
        seed=args.seed,
        log_every=max(1, args.steps // 10),
    )
    losses = train_qat(qat, token_stream(tokenizer, "train"), schedule, teacher=model)
    seconds = time.perf_counter() - start
    convert_qat_model(qat)
    row = {
        "rtn_ppl": ppl(rtn, ids),
        "gptq_ppl": ppl(gptq, ids),
        "qat_ppl": ppl(qat, ids),
        "qat_seconds": round(seconds, 1),
        "qat_seconds_per_step": round(seconds / args.steps, 3),
        "qat_kl_per_step": [round(x, 4) for x in losses],
    }
    print(
        f"{bits}-bit g{args.group_size}: RTN {row['rtn_ppl']:.1f}  GPTQ {row['gptq_ppl']:.1f}  "
        f"QAT {row['qat_ppl']:.1f}  ({seconds:.0f} s of QAT)",
        flush=True,
    )
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, tokenizer = load_model("course", device="cpu")
    ids = heldout_ids(tokenizer, args.eval_tokens)
    figures: dict = {
        "model": "course",
        "eval_tokens": len(ids),
        "group_size": args.group_size,
        "symmetric": False,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "qat_loss": "KL(float || quantized) per token (distillation)",
        "fp_ppl": ppl(model, ids),
    }
    print(f"float: perplexity {figures['fp_ppl']:.1f} on {len(ids):,} held-out tokens", flush=True)
    for bits in args.bits:
        figures[f"{bits}bit"] = one_width(model, tokenizer, ids, bits, args)
    targets = {
        f"qat_beats_gptq_{b}bit": figures[f"{b}bit"]["qat_ppl"] < figures[f"{b}bit"]["gptq_ppl"]
        for b in args.bits
    }
    for name, met in targets.items():
        print(f"{'PASS' if met else 'MISS'}  {name}")
    print("wrote", save_record("qat", figures, targets))


if __name__ == "__main__":
    main()
