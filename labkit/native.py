"""Building labkit's C++ kernels on first use: torch.utils.cpp_extension, once per CPU, cached.

labkit has two kernels that plain PyTorch does not ship for a CPU: the int4 x int8 matmul
(quant/vnni.py) and paged decode attention (engine/paged_kernel.py), and one op that calls oneDNN's
matmul without PyTorch's per-call overhead (engine/onednn_linear.py). Each is one C++ file that registers
torch ops; `build` compiles it with the machine's own instruction set (-march=native, about 15-30 s)
into `.cache/torch_extensions/<name>_<cpu hash>/` in the repository and loads it. A build is tied to the
CPU it was made on, so a repository copied to another machine (with its .cache/) builds again there.
Without a C++ compiler or ninja, or when the build fails, `build` warns and returns False, and the caller
keeps its plain-PyTorch path: nothing in the course needs these kernels to run, only to run faster.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from .paths import REPO_ROOT

BUILD_CACHE = REPO_ROOT / ".cache" / "torch_extensions"


def capability_flags() -> list[str]:
    """The defines that select ATen's vector code (at::vec::Vectorized) for this CPU, as PyTorch's own
    kernels are built once per capability: AVX512, AVX2, or the portable default."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def build(
    name: str,
    source: Path,
    flags: list[str],
    what: str,
    disable: str,
    ldflags: tuple[str, ...] = (),
) -> bool:
    """Compile and load `source` as the extension `name` (an op library; nothing is imported), with extra
    compiler `flags` and linker `ldflags`. False, with a warning naming `what` falls back and the variable
    `disable` that skips the build, if it cannot."""
    if shutil.which("ninja") is None:  # pip's ninja package puts it beside the interpreter
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ["PATH"]
        except ImportError:
            return False
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    from torch.utils.cpp_extension import load

    build_dir = BUILD_CACHE / f"{name}_{cpu_signature()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name,
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp", *ldflags],
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        warnings.warn(
            f"labkit: {source.name} did not build, so {what} ({error}). Set {disable}=1 to skip the build.",
            stacklevel=3,
        )
        return False
    return True


def cpu_signature() -> str:
    """A short hash of this CPU's model and instruction-set flags: the kernels are built with
    -march=native, so a build must not be loaded on another CPU; each CPU gets its own build directory."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return hashlib.sha1("\n".join(sorted(set(lines))).encode()).hexdigest()[:10]
