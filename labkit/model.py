"""Load the course model (shipped, offline) or any Hugging Face hub model, the same way.

Every notebook starts with `model, tokenizer = load_model(MODEL)`. `MODEL = None` means: the
`LABKIT_MODEL` environment variable if set, else the course model in `course_model/`. A hub id such
as "gpt2" or "facebook/opt-125m" needs a network the first time (then the HF cache serves it).
"""

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .device import pick_device
from .paths import COURSE_MODEL_DIR

COURSE_MODEL = "course"


def resolve_model_name(name: str | None = None) -> str:
    """'course' (or None with no LABKIT_MODEL set) -> the shipped directory; anything else unchanged."""
    name = name or os.environ.get("LABKIT_MODEL") or COURSE_MODEL
    if name == COURSE_MODEL:
        if not (COURSE_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"course model not found in {COURSE_MODEL_DIR}; it ships with the repository "
                "(re-clone, or retrain with `python -m labkit.train`)"
            )
        return str(COURSE_MODEL_DIR)
    return name


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
