"""Compiled decode: the per-op tax removed, the step compiled once and reused for every batch.

A decode step of a small model is about 1,800 small operations (norms, rotary, residual adds, dtype
conversions, the matmuls), and on a CPU each costs a few microseconds of dispatch before it does any work; on
a GPU each is a kernel launch. For SmolLM2 at batch 1 that overhead is most of an int4 step (notebook 03b).
Production engines remove it by compiling or capturing the step:
- vLLM compiles the model with `torch.compile` (Inductor) once, with the number of tokens as a dynamic
  dimension, and keeps attention and the cache write as custom ops that the graph calls; on a GPU it then
  captures one CUDA graph per batch size from that compiled code;
- SGLang's CPU graph runner compiles one graph per batch size and pads each batch up to the nearest one;
- nano-vllm captures one CUDA graph per batch size (1, 2, 4, 8, then every 16), with padded rows.
This file does the same, in three pieces:

1. **Which graph runs a step.** On a CPU nothing is replayed, so nothing needs padding: one graph for
   batch 1 (the latency case, every shape fixed) and one whose batch dimension is dynamic, for 2 to
   max_num_seqs sequences. Padding would cost real work there: a CPU decode step of SmolLM2 grows with every
   row (the matmuls are compute-bound from a few rows up), and 17 sequences padded to 24 ran 10% slower
   than eager, while the dynamic graph ran as fast as a graph compiled for that exact size. On CUDA a graph
   replays fixed shapes: one per capture size (1, 2, 4, then every 8, vLLM's list; `capture_sizes`), each
   batch padded up to the nearest. A padding row is token 0 at position 0, one key long, writing its K/V
   into the one block the engine keeps beside the block manager's (`padding_block`), which no sequence is
   ever given: padded rows can never change a sequence's KV.
2. **Attention in the graph as one opaque op.** On a CPU, from two rows up, a C++ kernel
   (`labkit_attention::paged_decode_attention`, paged_kernel.py, as vLLM and SGLang attend on a CPU) reads
   each row's keys through its block table where they lie; the tables [S, M] and lengths are built once per
   step outside the graph, and M, the table's width, is dynamic, so one graph serves every context length.
   Where the kernel cannot be built, `labkit::decode_attention` (attention.py) runs the eager path's ragged
   kernel instead, its index tensors' lengths dynamic in the same way: 13-18 ms of a 76-82 ms step at 16
   sequences on one thread, and steps at 16 and 32 sequences 6-14% slower than with the kernel (paired).
   (Gathering every row's blocks to a padded [S, M] table inside the graph instead cost 9-12 ms per layer
   at 32 sequences of about 200 tokens, against 0.8 ms for the ragged kernel.) On CUDA, where every shape
   must be fixed, `padded_decode_attention` gathers each row's M blocks and masks the keys past its
   length; M, the table's width, is the one dynamic dimension. The
   CPU's batch-1 graph takes the same padded table, but attends with `streamed_decode_attention`, loops
   that Inductor fuses and that read the keys where they lie, cheaper for one row than the ragged kernel's
   ops (`CompiledDecode.padded`). The paged-cache write is an `index_copy_` inside the graph (what
   gpt-fast and Hugging Face's static cache do).
3. **Everything else in one Inductor graph**: embedding, RMSNorms, the fused projections, rotary, residual
   adds, SwiGLU, the output head. Pointwise chains become a few fused C++ loops with no Python between
   them. From two rows up the matmuls stay the library kernels the eager path uses (the int4/int8 kernels,
   and for float weights the pre-packed oneDNN weight through `labkit_onednn::linear`, onednn_linear.py,
   or where that is not built `labkit::packed_linear`, fast_layers.py); the
   CPU's batch-1 graph streams float and 8-bit weights through reductions Inductor generates instead,
   faster than the libraries' matrix-vector code (labkit/matvec.py), and on a CPU with AVX512-VNNI
   multiplies 4-bit weights by the row quantized to 8 bits, in integers (labkit/quant/vnni.py). On CUDA the
   graph is captured as a CUDA graph (`reduce-overhead`): one launch replays the step.

Which steps run compiled: pure decode steps (every sequence feeds one token and gets one logits row), which
includes n > 1 samples once forked, sampled tokens' logprobs and seeded sampling. Prefill, chunked
prefill, mixed prefill/decode steps, speculative verification (1 + k tokens a sequence) and prompt logprobs
run the eager `ModelRunner.forward`: their shapes change with every prompt, and a prompt's matmuls are big
enough that per-op overhead matters little there. `EngineConfig(enforce_eager=True)` (vLLM's name) turns
compilation off.

When to compile: compiling one graph takes 10-60 s on a 2-core CPU (seconds from the on-disk cache), so an
engine that lives for a test or a notebook cell should not pay it, and a server or a benchmark should pay
it before its first request, not in the middle of a run. So nothing compiles by itself: `LLMEngine.warm_up()`
compiles every graph up front, as vLLM and SGLang do at start-up, and until then every step runs eagerly.
`EngineConfig(compile_after_steps=n)` adds a JIT's tiering instead (the JVM's, LuaJIT's): a graph compiles
once it has run n steps eagerly (0: at its first step). The generated code is cached on disk under
`.cache/torchinductor/` in the repository (git-ignored), so the next process that compiles the same model
and size skips most of the work.
"""

import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..paths import REPO_ROOT
from ..quant import QuantLinear
from .attention import (
    DecodeRows,
    decode_attention_op,
    padded_decode_attention,
    padded_tables,
    streamed_decode_attention,
)
from .fast_layers import decoder_layer
from .paged_kernel import available as paged_kernel_available
from .paged_kernel import paged_decode_attention

# Inductor's on-disk cache (FX graphs, generated C++), unless the user chose a place
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "torchinductor"))

# Inductor's options on a CPU. `size_asserts` off, as vLLM's CPU backend sets it (vllm/platforms/cpu.py):
# the generated Python checks the size and stride of every buffer it is handed, 880 calls in a batch-1
# SmolLM2 step through the per-layer region, work that re-proves what the graph was compiled for.
# Measured and not kept (2-core AMD EPYC, batch 1): `freezing` (weights as constants) ran no faster, since
# the big weights sit behind the low-bit kernels and the pre-packed oneDNN op anyway, and it bypasses the
# compile cache (a second start 14.3 s instead of 6.0 s); `cpp_wrapper` doubled the compile time (about
# 100 s); max-autotune's C++ GEMM template ran SmolLM2's float32 layer 2.3x slower than oneDNN at 16 rows.
CPU_OPTIONS: dict = {"size_asserts": False}


@torch.compiler.nested_compile_region
def decoder_layer_once(*args) -> torch.Tensor:
    """`decoder_layer`, compiled once and called for every layer (CompiledDecode.layer_once). A wrapper of
    its own: Dynamo marks the code it is given, and plain calls of decoder_layer must stay plain."""
    return decoder_layer(*args)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes that get a CUDA graph: 1, 2, 4, then every 8 (vLLM's default capture sizes),
    and max_num_seqs itself, so that every batch the scheduler can form has a size to run in."""
    sizes = [s for s in [1, 2, 4, *range(8, max_num_seqs + 1, 8)] if s <= max_num_seqs]
    return sizes if sizes[-1] == max_num_seqs else [*sizes, max_num_seqs]


class CompiledDecode:
    """The runner's decode step, compiled. `sizes` are the graphs' sizes: on CUDA the capture sizes, on a
    CPU 1 and max_num_seqs (whose graph serves every batch from 2 up). `run(step)` takes a StepInput whose
    `plain_decode` is True and at most max_num_seqs rows; `compile_seconds` records each graph's first
    call (compilation included), by size."""

    def __init__(self, runner, max_num_seqs: int, compile_after_steps: int | None):
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.sizes = capture_sizes(max_num_seqs) if self.cuda else sorted({1, max_num_seqs})
        self.compile_after_steps = compile_after_steps
        # decode steps each graph has run eagerly so far (for compile_after_steps)
        self.eager_steps = dict.fromkeys(self.sizes, 0)
        self.compile_seconds: dict[int, float] = {}
        # the last block of the cache: the engine never hands it to a sequence (engine.py)
        self.padding_block = runner.cache.num_blocks - 1
        self.graphs: dict[int, Callable] = {}  # size -> its compiled step
        # attention over padded block tables, in the graph: on CUDA (fixed shapes), for a quantized cache,
        # whose 8-bit blocks the ragged kernel cannot read (attention.py), and for one row (see `padded`)
        self.always_padded = self.cuda or runner.cache.quantized
        self.quantized = any(isinstance(m, QuantLinear) for m in runner.model.modules())
        if self.cuda:
            # a CUDA graph may write only to tensors whose address is fixed: the cache's
            for t in runner.cache.tensors:
                torch._dynamo.mark_static_address(t)

    @functools.cached_property
    def paged_kernel(self) -> bool:
        """Do graphs for two or more rows attend with the C++ kernel (paged_kernel.py)? On a CPU's float32
        cache, where it is built. Its vector path is float32's: on a bfloat16 cache it measured slower than
        the ragged op (16 rows: 386-429 vs 243-268 us a layer), so 16-bit caches keep the ragged op. Asked
        first when a step is laid out for a graph, so an engine that never compiles never builds it."""
        return (
            not self.always_padded
            and self.runner.cache.k[0].dtype == torch.float32
            and paged_kernel_available()
        )

    def padded(self, rows: int) -> bool:
        """Does the graph for `rows` sequences take padded block tables, rather than the ragged kernel's
        index tensors? Always on CUDA and for a quantized cache; on a CPU for one row, and for more where the
        C++ kernel is built (`paged_kernel`: it reads only each row's own blocks from the table). The ragged
        kernel is about ten eager ops, 80-120 us a layer whatever the batch, a third of an int4 batch-1 step.
        For one sequence over a float cache the graph attends with `streamed_decode_attention`, which
        Inductor fuses into loops that read the keys through the block table. int4, 64-token context: 9.6 ms
        a step with the ragged op, 7.2 with the padded form's copy and attention kernel, 6.6-6.9 streamed
        (runs minutes apart, not paired); at 1,000 tokens about 14 ms ragged, 11 streamed. From a few rows
        up, the padded forms pay for every row's blocks padded to the longest: `streamed_decode_attention`
        measured faster than the ragged op on even lengths (16 rows of 20-200 tokens: 262 vs 378 us a
        layer) and slower on skewed ones (one of 300 among 31 of 20-60: 535 vs 405), so the dynamic-batch
        graph attends with the C++ kernel, or else the ragged op."""
        return self.always_padded or rows == 1 or self.paged_kernel

    def layer_once(self) -> bool:
        """Do this runner's graphs compile one decoder layer and call it for every layer (regional
        compilation, `decoder_layer_once`), rather than trace all 30 into one graph? Dynamo, AOTAutograd
        and Inductor then work on one layer instead of thirty: SmolLM2's fp32 batch-1 graph compiled in
        20 s instead of 66-75, at the same speed (paired: 55.1-55.5 vs 54.3-56.4 tok/s). Float weights
        only: each layer becomes a call from the graph's wrapper with no fusion across its boundary, which
        cost an int4 batch-1 step (5 ms) 16% (160 vs 191 tok/s), and PyTorch 2.13 passes the int4
        kernel's group size into such a layer as a tensor, which the kernel refuses. Not on CUDA, whose
        graphs this has not been measured with."""
        return not self.cuda and not self.quantized

    def compile(self, size: int) -> Callable:
        """A new compiled region for graph `size`. Its own cache entry (`isolate_recompiles`), and no guards:
        this class dispatches on the size itself and feeds each region the same kinds of tensors and the
        same weights every step, so Dynamo's guard checks (over a millisecond a step for SmolLM2's ~400
        tensors and their Python attributes) would only re-prove that; vLLM drops them for the same reason."""
        options: dict = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        one_layer = decoder_layer_once if self.layer_once() else None
        return torch.compile(
            functools.partial(self.forward, one_layer=one_layer, one_row=size == 1),
            fullgraph=True,
            mode="reduce-overhead" if self.cuda else None,
            options=options if self.cuda else {**options, **CPU_OPTIONS},
            isolate_recompiles=True,
        )

    def size_for(self, batch: int) -> int | None:
        """The graph that runs `batch` rows (the smallest size that holds them), or None (too many: eager)."""
        return next((s for s in self.sizes if s >= batch), None)

    def takes(self, step) -> bool:
        """Should this step run compiled? A plain decode step whose graph is compiled, or hot enough to
        compile now; otherwise the step counts towards its graph's eager steps and runs eagerly."""
        size = self.size_for(step.input_ids.shape[0]) if step.plain_decode else None
        if size is None:
            return False
        if size in self.compile_seconds:
            return True
        after = self.compile_after_steps
        if after is not None and self.eager_steps[size] >= after:
            return True
        self.eager_steps[size] += 1
        return False

    def forward(
        self, input_ids, positions, slots, *index, one_layer=None, one_row=False
    ) -> torch.Tensor:
        """The traced step. input_ids, positions and slots (where each row's K/V goes) [S]; index: how the
        rows find their keys (`index_inputs`) -> logits [S, vocab]. one_layer: see `layer_once`; one_row:
        the graph for batch 1 (see `padded`)."""
        r = self.runner
        hidden = r.model.model.embed_tokens(input_ids)  # [S, hidden]
        cos, sin = r.rotary(hidden, positions)
        cache_index = r.cache.write_index(slots)

        def attend(i: int, q, k, v):
            r.cache.write(i, cache_index, k, v)
            if len(index) == 2:  # block tables and lengths (see `padded`)
                tables, context_lens = index
                if not self.always_padded:  # a CPU's float cache
                    attend_rows = streamed_decode_attention if one_row else paged_decode_attention
                    return attend_rows(q, r.cache.k[i], r.cache.v[i], tables, context_lens, r.scale)
                return padded_decode_attention(
                    q, r.cache.k[i], r.cache.v[i], tables, context_lens, r.scale, *r.cache.scales(i)
                )
            return decode_attention_op(q, r.cache.k[i], r.cache.v[i], *index, r.scale)

        hidden = r.layers_forward(hidden, cos, sin, attend, one_layer=one_layer)
        return r.lm_head(r.final_norm(hidden))

    def index_inputs(self, context_lens: list[int], tables: list[list[int]]) -> list[torch.Tensor]:
        """The attention's inputs for S rows (padding rows included). On a CPU: the ragged DecodeBatch's
        index tensors, for the custom op that runs `decode_attention` (each row reads only its own keys).
        Where `padded(S)`: block tables [S, M] (M >= 2: a dynamic dimension of size 1 would be specialised)
        and the context lengths [S], for `padded_decode_attention` or `streamed_decode_attention`."""
        runner = self.runner
        if not self.padded(len(context_lens)):
            rows = DecodeRows(list(range(len(context_lens))), context_lens, tables)
            return list(runner.decode_batch(rows).index_tensors())
        padded = padded_tables(context_lens, tables, runner.block_size, min_blocks=2)
        return [runner._longs(padded), runner._longs(context_lens)]

    def inputs(self, step, rows: int) -> list[torch.Tensor]:
        """The step's decode rows padded to `rows`: padding rows are token 0 at position 0, one key long,
        writing and reading only the padding block."""
        decode, bs, pad = step.decode, self.runner.block_size, self.padding_block
        extra = rows - len(decode.token_index)  # padding rows
        return [
            F.pad(step.input_ids, (0, extra)),
            F.pad(step.positions, (0, extra)),
            self.runner._longs(step.slots + [pad * bs] * extra),
            *self.index_inputs(decode.context_lens + [1] * extra, decode.tables + [[pad]] * extra),
        ]

    @torch.inference_mode()
    def run(self, step) -> torch.Tensor:
        """logits [B, vocab] for a plain decode step of B sequences: padded to its graph's size on CUDA,
        B rows as they are on a CPU."""
        batch, size = step.input_ids.shape[0], self.size_for(step.input_ids.shape[0])
        assert step.plain_decode and step.decode is not None and size is not None
        return self.call(size, self.inputs(step, size if self.cuda else batch))[:batch]

    def call(self, size: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Run graph `size` on the inputs, compiling it at its first call."""
        if size in self.graphs:
            return self.graphs[size](*inputs)
        dynamic_batch = size > 1 and not self.cuda  # a CPU's one graph for every batch from 2 up
        for t in inputs[:3]:
            (torch._dynamo.mark_dynamic if dynamic_batch else torch._dynamo.mark_static)(t, 0)
        # the index tensors' lengths follow the context lengths (and the batch): dynamic, so one graph
        # serves every length
        padded = self.padded(size)
        dims = PADDED_DIMS if padded else RAGGED_DIMS
        batch_dims = PADDED_BATCH_DIMS if padded else RAGGED_BATCH_DIMS
        for t, length, batch in zip(
            inputs[3:], dims, batch_dims if dynamic_batch else [()] * len(dims)
        ):
            for dim in (*length, *batch):
                torch._dynamo.mark_dynamic(t, dim)
        start = time.perf_counter()
        self.graphs[size] = self.compile(size)
        # each dynamic length its own symbol, even where two happen to be equal now (duck sizing would
        # tie them together, and the compiled code would then assert that they stay equal)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            logits = self.graphs[size](*inputs)
        self.compile_seconds[size] = time.perf_counter() - start
        return logits

    @torch.inference_mode()
    def warm_up(self, sizes: list[int] | None = None) -> dict[int, float]:
        """Compile the graphs of the given sizes (default: all) now, on padding rows alone (they write only
        the padding block), instead of at their first real step, as vLLM and SGLang do at start-up.
        Seconds per size."""
        runner, pad = self.runner, self.padding_block
        for size in sizes or self.sizes:
            if size not in self.compile_seconds:
                zeros = torch.zeros(size, dtype=torch.long, device=runner.device)
                slots = runner._longs([pad * runner.block_size] * size)
                index = self.index_inputs([1] * size, [[pad]] * size)
                self.call(size, [zeros, zeros.clone(), slots, *index])
        return dict(self.compile_seconds)


# The dynamic dimensions of each index input, in index_inputs' order: those that follow the context
# lengths, and those that follow the batch (dynamic in a CPU's graph for 2 and more sequences).
#                   k_rows, k_offsets, k_owner, mask,   keys,  v_rows, v_offsets
RAGGED_DIMS: list[tuple[int, ...]] = [(0,), (0,), (0,), (2,), (0,), (0,), ()]
RAGGED_BATCH_DIMS: list[tuple[int, ...]] = [(), (), (), (1,), (), (), (0,)]
PADDED_DIMS: list[tuple[int, ...]] = [(1,), ()]  # the tables' width; the context lengths
PADDED_BATCH_DIMS: list[tuple[int, ...]] = [(0,), (0,)]
