"""Walking a transformer the way layer-wise quantizers do: now two files, layers.py (blocks, linears, their
weights, the output head) and calibration.py (hooks, calibration passes, block-by-block inputs).

Kept so that `from labkit.quant.walk import ...` (notebooks 01-03, benchmarks/quant.py) goes on working.
"""

from .calibration import (
    block_inputs,
    capture_inputs,
    hooked,
    run_block,
    run_calibration,
    sequential_groups,
)
from .layers import (
    LINEAR_TYPES,
    Conv1D,
    find_blocks,
    find_linears,
    get_weight,
    output_head,
    quantizable_layers,
    set_weight,
    untie_output_head,
)

__all__ = [
    "LINEAR_TYPES",
    "Conv1D",
    "block_inputs",
    "capture_inputs",
    "find_blocks",
    "find_linears",
    "get_weight",
    "hooked",
    "output_head",
    "quantizable_layers",
    "run_block",
    "run_calibration",
    "sequential_groups",
    "set_weight",
    "untie_output_head",
]
