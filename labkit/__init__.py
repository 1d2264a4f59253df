"""labkit: the small, readable toolkit behind the LLM optimization course.

Each module is one idea; read them alongside the notebooks.
"""

from .device import pick_device
from .model import count_parameters, load_model, load_tokenizer

__all__ = ["pick_device", "load_model", "load_tokenizer", "count_parameters"]
