"""The production quantization libraries, run in their own venv: see labkit/workers/quant_client.py.

Kept so that `from labkit.quant.libs import libraries_available, run_library` (notebooks 02-03,
benchmarks/quant.py) goes on working.
"""

from ..workers.quant_client import libraries_available, run_library

__all__ = ["libraries_available", "run_library"]
