"""Paged decode attention in C++: the compiled step's attention for batches of two and more on a CPU.

Decode attention is tiny arithmetic (one query per sequence against its few hundred keys) spread over
scattered cache blocks. The eager path's ragged kernel (attention.decode_attention) does it with about a
dozen PyTorch ops per layer: two embedding_bags that read the blocks in place, a softmax, index_selects,
each allocating its output and paying dispatch. Inside the compiled step that is one opaque op whose inside
still runs op by op; measured in SmolLM2's engine at 16 sequences on one thread it took 13-18 ms of a 76-82
ms step (the step with attention replaced by a copy of q: 61-64 ms). vLLM and SGLang run this part as
C++ kernels on a CPU (vLLM's csrc/cpu attention, SGLang's decode_attention_cpu) for that reason.

csrc/paged_decode_attention.cpp is that loop, written to be read: per (sequence, KV head), the scores of
its query heads block by block (K is stored transposed within a block, so one block's keys for one dimension
are one vector), a softmax in float, then the values row by row; it reads each sequence's blocks where they
lie, with no padding and no copy. It is built on first use (labkit/native.py; about 15 s) and tested against
`decode_attention` (tests/test_paged_kernel.py). Per layer, in isolation (16 sequences of 20-200 keys, one
thread, float32): 141 us against 216 for the ragged kernel; 32 sequences: 159 against 301. In the engine,
two compiled engines paired in one process: steps at 16 and 32 sequences 6-14% faster with it; and
benchmarks/results/engine.json, labkit against vLLM: 0.89x -> 0.93x on the mixed workload, 0.92x -> 0.95x
at 16 requests, 0.98x -> 1.02x at 64.

Only the compiled step's graph for two or more sequences calls it (compiled_decode.py), for a float32 cache
on a CPU; the eager path keeps `decode_attention`, the reference. It computes bfloat16 and float16 caches
correctly too (tested), but its vector path is float32's: on a bfloat16 cache it measured slower than the
ragged kernel (16 sequences: 386-429 against 243-268 us a layer), so the engine does not use it there. `LABKIT_NO_PAGED_KERNEL=1` turns it off.
"""

import os
from functools import cache

import torch

from .. import native
from ..paths import REPO_ROOT

SOURCE = REPO_ROOT / "labkit" / "engine" / "csrc" / "paged_decode_attention.cpp"
DISABLE = "LABKIT_NO_PAGED_KERNEL"  # set to 1: the ragged PyTorch kernel everywhere


@cache
def available() -> bool:
    """Is the kernel built and loaded (now, the first time)? False without a C++ compiler or ninja, when
    the build fails (with a warning), or with LABKIT_NO_PAGED_KERNEL=1."""
    if os.environ.get(DISABLE) == "1":
        return False
    what = "the compiled decode step attends with the ragged PyTorch kernel"
    if not native.build("labkit_attention", SOURCE, native.capability_flags(), what, DISABLE):
        return False
    torch.library.register_fake("labkit_attention::paged_decode_attention")(_attention_shape)
    return True


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, heads, D], one layer's cache (k [kv_heads, blocks, D, block], v [kv_heads, slots, D]), block
    tables [B, M] and context lengths [B] (int64) -> [B, heads, D]: each row attends to its first
    context_lens keys. The same result as attention.decode_attention, one op."""
    return torch.ops.labkit_attention.paged_decode_attention(
        q, k_cache, v_cache, tables, context_lens, scale
    )


def _attention_shape(q, k_cache, v_cache, tables, lens, scale):
    return torch.empty_like(q)
