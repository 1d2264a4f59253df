"""Compiled decode: the per-op tax removed, one graph per padded batch size.

A decode step of a small model is about 1,800 small operations (norms, rotary, residual adds, dtype
conversions, the matmuls), and on a CPU each costs a few microseconds of dispatch before it does any work; on
a GPU each is a kernel launch. For SmolLM2 at batch 1 that overhead is most of an int4 step (notebook 03b).
Production engines remove it by compiling or capturing the step:
- vLLM's CPU backend runs the model through `torch.compile` (Inductor) and keeps attention and the cache
  write as custom ops that the graph calls;
- SGLang's CPU graph runner compiles one graph per batch size and pads each batch up to the nearest one;
- nano-vllm and vLLM capture one CUDA graph per batch size (nano-vllm: 1, 2, 4, 8, then every 16).
This file does the same, in three pieces:

1. **Static shapes.** A decode step of B sequences runs the graph compiled for the smallest size >= B
   (`capture_sizes`). The extra rows are padding: token 0 at position 0, writing its K/V into the one
   block the engine keeps beside the block manager's (`padding_block`), which no sequence is ever given,
   and attending to that block alone. Padded rows can therefore never change a sequence's KV.
2. **Attention in the graph, with static shapes too**: `padded_decode_attention` gathers each row's first M
   blocks ([S, M] block table) and masks the keys past its length, then runs one fused
   `scaled_dot_product_attention`; the cache write is an `index_copy_` inside the graph (what gpt-fast
   and Hugging Face's static cache do). M, the longest row's blocks, is the one dimension left dynamic
   (`mark_dynamic`), so a graph serves every context length: one compilation per batch size, not per
   length. The eager path keeps `decode_attention`, whose ragged bags read only the real keys.
3. **Everything in one Inductor graph**: embedding, RMSNorms, the fused projections, rotary, residual adds,
   SwiGLU, attention, the output head. Pointwise chains become a few fused C++ loops with no Python
   between them; the matmuls stay the library kernels the eager path uses (the int4/int8 kernels, and for
   float weights the pre-packed oneDNN weight through `labkit::packed_linear`, fast_layers.py). On CUDA
   the same graph is captured as a CUDA graph (`reduce-overhead`): one launch replays the step.

Which steps run compiled: pure decode steps (every sequence feeds one token and gets one logits row), which
includes n > 1 samples once forked, sampled tokens' logprobs and seeded sampling. Prefill, chunked
prefill, mixed prefill/decode steps, speculative verification (1 + k tokens a sequence) and prompt logprobs
run the eager `ModelRunner.forward`: their shapes change with every prompt, and a prompt's matmuls are big
enough that per-op overhead matters little there. `EngineConfig(enforce_eager=True)` (vLLM's name) turns
compilation off.

When to compile: compiling one size takes 10-60 s on a 2-core CPU (seconds from the on-disk cache), so an
engine that lives for a test or a notebook cell should not pay it, and a server or a benchmark should pay
it before its first request, not in the middle of a run. So nothing compiles by itself: `LLMEngine.warm_up()`
compiles every size up front, as vLLM and SGLang do at start-up, and until then every step runs eagerly.
`EngineConfig(compile_after_steps=n)` adds a JIT's tiering instead (the JVM's, LuaJIT's): a size compiles
once it has run n steps eagerly (0: at its first step). The generated code is cached on disk under
`.cache/torchinductor/` in the repository (git-ignored), so the next process that compiles the same model
and size skips most of the work.
"""

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..paths import REPO_ROOT
from .attention import padded_decode_attention

# Inductor's on-disk cache (FX graphs, generated C++), unless the user chose a place
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "torchinductor"))

# Inductor's options on a CPU: none. Measured on SmolLM2 (2-core AMD EPYC, batch 1): `freezing` (weights
# as constants) ran no faster, since the big weights sit behind the low-bit kernels and the pre-packed
# oneDNN op anyway, and it bypasses the compile cache (a second start 14.3 s instead of 6.0 s); `cpp_wrapper`
# doubled the compile time (about 100 s).
CPU_OPTIONS: dict = {}


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes that get a graph: 1, 2, 4, 8, then every 16 (nano-vllm's choice), and
    max_num_seqs itself, so that every batch the scheduler can form has a size to run in."""
    sizes = [s for s in [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)] if s <= max_num_seqs]
    return sizes if sizes[-1] == max_num_seqs else [*sizes, max_num_seqs]


class CompiledDecode:
    """The runner's decode step compiled once per padded batch size. `run(step)` takes a StepInput whose
    `plain_decode` is True and at most `sizes[-1]` rows; `compile_seconds` records each compiled size's
    first call (compilation included)."""

    def __init__(self, runner, max_num_seqs: int, compile_after_steps: int | None):
        self.runner = runner
        self.sizes = capture_sizes(max_num_seqs)
        self.compile_after_steps = compile_after_steps
        # decode steps each size has run eagerly so far (for compile_after_steps)
        self.eager_steps = dict.fromkeys(self.sizes, 0)
        self.compile_seconds: dict[int, float] = {}
        # the last block of the cache: the engine never hands it to a sequence (engine.py)
        self.padding_block = runner.cache.num_blocks - 1
        self.graphs: dict[int, Callable] = {}  # size -> its compiled step
        if runner.device.type == "cuda":
            # a CUDA graph may write only to tensors whose address is fixed: the cache's
            for t in runner.cache.tensors:
                torch._dynamo.mark_static_address(t)

    def compile(self) -> Callable:
        """A new compiled region for one size. Its own cache entry (`isolate_recompiles`), and no guards:
        this class dispatches on the size itself and feeds each region the same shapes, tensors and
        weights every step, so Dynamo's guard checks (over a millisecond a step for SmolLM2's ~400 tensors
        and their Python attributes) would only re-prove that; vLLM drops them for the same reason."""
        cuda = self.runner.device.type == "cuda"
        options: dict = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        return torch.compile(
            self.forward,
            fullgraph=True,
            mode="reduce-overhead" if cuda else None,
            options=options if cuda else {**options, **CPU_OPTIONS},
            isolate_recompiles=True,
        )

    def size_for(self, batch: int) -> int | None:
        """The smallest compiled size that holds `batch` rows, or None (too many: run eagerly)."""
        return next((s for s in self.sizes if s >= batch), None)

    def takes(self, step) -> bool:
        """Should this step run compiled? A plain decode step of a size that is compiled, or hot enough to
        compile now; otherwise the step counts towards its size's eager steps and runs eagerly."""
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

    def forward(self, input_ids, positions, slots, tables, context_lens) -> torch.Tensor:
        """The traced step. input_ids, positions, slots (where each row's K/V goes) and context_lens [S],
        tables [S, M] -> logits [S, vocab]."""
        r = self.runner
        hidden = r.model.model.embed_tokens(input_ids)  # [S, hidden]
        cos, sin = r.rotary(hidden, positions)
        cache_index = r.cache.write_index(slots)

        def attend(i: int, q, k, v):
            r.cache.write(i, cache_index, k, v)
            return padded_decode_attention(
                q, r.cache.k[i], r.cache.v[i], tables, context_lens, r.scale, *r.cache.scales(i)
            )

        hidden = r.layers_forward(hidden, cos, sin, attend)
        return r.lm_head(r.final_norm(hidden))

    def inputs(self, step, size: int) -> tuple[torch.Tensor, ...]:
        """The step's decode rows padded to `size` rows and their block tables to M >= 2 columns (a
        dynamic dimension of size 1 would be specialised): padding rows point at the padding block."""
        rows, bs, pad = step.decode, self.runner.block_size, self.padding_block
        extra = size - len(rows.token_index)  # padding rows
        width = max(2, -(-max(rows.context_lens) // bs))
        tables = [t[:width] + [pad] * (width - len(t[:width])) for t in rows.tables]
        tables += [[pad] * width] * extra
        longs = self.runner._longs
        return (
            F.pad(step.input_ids, (0, extra)),
            F.pad(step.positions, (0, extra)),
            longs(step.slots + [pad * bs] * extra),
            longs(tables),
            longs(rows.context_lens + [1] * extra),
        )

    @torch.inference_mode()
    def run(self, step) -> torch.Tensor:
        """logits [B, vocab] for a plain decode step of B sequences, padded to its compiled size."""
        batch = step.input_ids.shape[0]
        size = self.size_for(batch)
        assert step.plain_decode and step.decode is not None and size is not None
        return self.call(self.inputs(step, size))[:batch]

    def call(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        size = inputs[0].shape[0]
        if size in self.graphs:
            return self.graphs[size](*inputs)
        for t in inputs:  # the batch dimension is static: one graph per size
            torch._dynamo.mark_static(t, 0)
        torch._dynamo.mark_dynamic(inputs[3], 1)  # the table's width: any context length, one graph
        start = time.perf_counter()
        self.graphs[size] = self.compile()
        logits = self.graphs[size](*inputs)
        self.compile_seconds[size] = time.perf_counter() - start
        return logits

    @torch.inference_mode()
    def warm_up(self, sizes: list[int] | None = None) -> dict[int, float]:
        """Compile the given sizes (default: all) now, on padding rows alone (they write only the padding
        block), instead of at their first real step, as vLLM and SGLang do at start-up. Seconds per size."""
        runner, pad = self.runner, self.padding_block
        for size in sizes or self.sizes:
            if size not in self.compile_seconds:
                zeros = torch.zeros(size, dtype=torch.long, device=runner.device)
                slots = torch.full((size,), pad * runner.block_size, device=runner.device)
                tables = torch.full((size, 2), pad, device=runner.device)
                self.call((zeros, zeros.clone(), slots, tables, torch.ones_like(zeros)))
        return dict(self.compile_seconds)
