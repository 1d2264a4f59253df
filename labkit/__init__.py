"""labkit: the small, readable toolkit behind the LLM optimization course.

Each module is one idea; read them alongside the notebooks.

`from labkit import load_model` works as usual, but torch and transformers are imported on first use
(PEP 562), not by `import labkit`: labkit.workers' protocol runs in venvs that have neither (llama.cpp's).
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "pick_device": "device",
    "load_model": "model",
    "load_tokenizer": "model",
    "count_parameters": "model",
}
__all__ = ["pick_device", "load_model", "load_tokenizer", "count_parameters"]

if TYPE_CHECKING:
    from .device import pick_device
    from .model import count_parameters, load_model, load_tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
