"""Load the course's models (offline) or any Hugging Face hub model, the same way.

Every notebook starts with `model, tokenizer = load_model(MODEL)`. A name is one of:
- None: the `LABKIT_MODEL` environment variable if set, else "course";
- an alias: "course" (the Austen model shipped in course_model/, fastest) or "smollm2"
  (SmolLM2-135M-Instruct, a real pretrained model provisioned by `make setup`: labkit/smollm2.py);
- a local model directory;
- a hub id such as "gpt2" or "facebook/opt-125m", which needs a network the first time.
A local directory with a SHA256SUMS file (smollm2 has one) is checked against it before loading.
"""

import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checksums import SUMS, verify_checksums
from .device import pick_device
from .paths import COURSE_MODEL_DIR, SMOLLM2_DIR

COURSE_MODEL = "course"
SMOLLM2 = "smollm2"
ALIASES = {COURSE_MODEL: COURSE_MODEL_DIR, SMOLLM2: SMOLLM2_DIR}
PROVIDE_COMMAND = "make setup (or: .venv/bin/python -m labkit.smollm2)"
REBUILD_COMMAND = ".venv/bin/python -m labkit.smollm2 --force"
HOW_TO_GET = {
    COURSE_MODEL: "it ships with the repository (re-clone, or retrain: python -m labkit.train)",
    SMOLLM2: f"provide it with: {PROVIDE_COMMAND}",
}
HOW_TO_REPAIR = {SMOLLM2: f"rebuild it: {REBUILD_COMMAND}"}
# "gpt2", "facebook/opt-125m": one or two names of letters, digits, '-', '_' and '.'
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_name(name: str | None = None) -> str:
    """An alias or None -> its checked directory; a directory -> itself, checked; a hub id -> unchanged."""
    name = name or os.environ.get("LABKIT_MODEL") or COURSE_MODEL
    if name in ALIASES:
        path = ALIASES[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name!r} not found in {path}; {HOW_TO_GET[name]}")
        return check_directory(path, HOW_TO_REPAIR.get(name, f"restore {path}"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a folder but not a model (no config.json in it)")
        return check_directory(path, f"restore or re-create {path}")
    if HUB_ID.match(name) and ".." not in name:
        return name
    raise ValueError(
        f"model {name!r} is neither a folder, an alias ({', '.join(ALIASES)}) nor a hub id "
        "(like 'gpt2' or 'facebook/opt-125m')"
    )


def check_directory(path: Path, fix_hint: str) -> str:
    if (path / SUMS).exists():
        verify_checksums(path, fix_hint=f"To fix it, {fix_hint}")
    return str(path)


def load_tokenizer(name: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name))
    if tokenizer.pad_token is None:  # GPT-2 and OPT-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | None = None, device: str | None = None, dtype: torch.dtype = torch.float32
):
    """Return (model in eval mode, tokenizer). float32 by default: CPUs run it fastest and it is the
    reference every quantized variant is compared against."""
    path = resolve_model_name(name)
    is_local = Path(path).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=is_local)
    except OSError as err:
        raise OSError(
            f"could not load {path!r}: hub models need a network the first time "
            f"(or set MODEL = None for the offline course model). Original error: {err}"
        ) from err
    model.to(pick_device(device)).eval()
    return model, load_tokenizer(path)


# a config that does not say how long a context it was trained for gets LlamaConfig's default
FALLBACK_CONTEXT_LENGTH = 2048


def context_length(model) -> int:
    """The longest sequence (prompt + generated tokens) the model takes, from its config."""
    return int(getattr(model.config, "max_position_embeddings", FALLBACK_CONTEXT_LENGTH))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
