"""labkit.op_tax: the op counter counts what a step dispatches (not the ops those call), and the readers of
Inductor's generated module find its fused loops and library calls."""

import torch

from labkit.op_tax import calls_per_step, fused_kernels, op_profile

GENERATED = """
cpp_fused_add_mul_0 = async_compile.cpp_pybinding(['const float*', 'float*'], r\'\'\'
extern "C" void kernel(const float* in_ptr0, float* out_ptr0) { out_ptr0[0] = in_ptr0[0] * 2 + 1; }
\'\'\')
class Runner:
    def call(self, args):
        cpp_fused_add_mul_0(buf0, buf1)
        buf2 = extern_kernels.mm(buf1, arg0)
        buf3 = torch.ops.aten._weight_int4pack_mm_for_cpu.default(buf2, arg1, 64, arg2)
        cpp_fused_add_mul_0(buf3, buf4)
"""


def test_op_profile_counts_dispatched_ops_once():
    x, w = torch.randn(4, 8), torch.randn(8, 8)

    def step():  # three dispatches: matmul (which calls mm), to (which calls _to_copy, copy_), add
        (x @ w).to(torch.float64) + 1

    profile = op_profile(step, calls=4)
    assert profile.ops_per_step == 3
    assert dict(profile.top_ops) == {"aten::matmul": 1, "aten::to": 1, "aten::add": 1}
    assert 0 < profile.matmul_ms <= profile.step_ms


def test_generated_code_readers():
    kernels = fused_kernels(GENERATED)
    assert list(kernels) == ["cpp_fused_add_mul_0"] and "kernel(" in kernels["cpp_fused_add_mul_0"]
    calls = calls_per_step(GENERATED)
    assert calls == {"fused C++ loop": 2, "mm": 1, "_weight_int4pack_mm_for_cpu": 1}
