"""Exercise check for notebook 03b (see labkit.checks: returns the student's function if it is right,
else labkit's reference, so the notebook always runs to the end)."""

from .checks import expect_close, run_check
from .roofline import decode_bound


def reference_decode_tok_s(
    weight_bytes, kv_bytes_per_seq, flops_per_seq, batch, bandwidth, flop_rate
):
    return decode_bound(weight_bytes, kv_bytes_per_seq, flops_per_seq, batch, bandwidth, flop_rate)[
        "tok_s"
    ]


def check_decode_tok_s(student):
    def test(fn):
        cases = [
            (540e6, 0, 270e6, 1, 20e9, 100e9),  # batch 1: memory-bound, 37 tok/s
            (540e6, 4e6, 270e6, 8, 20e9, 100e9),  # the KV cache adds bytes per sequence
            (540e6, 0, 270e6, 1000, 20e9, 100e9),  # a huge batch: compute-bound
            (13.5e9, 0.5e9, 13.5e9, 1, 3.35e12, 989e12),  # a 7B model in bf16 on an H100 SXM
        ]
        for args in cases:
            expect_close(fn(*args), reference_decode_tok_s(*args), f"decode_tok_s{args}", rel=1e-6)

    return run_check("decode_tok_s", student, reference_decode_tok_s, test)
