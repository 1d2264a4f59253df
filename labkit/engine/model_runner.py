"""A forward pass over a *flat* batch of tokens from many sequences, reading and writing the paged KV cache.

Hugging Face's `model(...)` wants rectangular [batch, seq] inputs and its own cache object. A serving
engine instead packs whatever each sequence needs this step - a whole prompt, a chunk of one, or a single
decode token - into one list of T tokens. Linear layers (almost all the FLOPs) do not care which sequence a
token belongs to: they run once on [T, hidden]. Only attention does, and it reads each sequence's past keys
and values through its block table.

We reuse the model's own weights and modules (embeddings, projections, norms, MLP, rotary embedding), so
this works for the course model and Llama-family hub models (Llama, Mistral, Qwen2, ...).

LoRA adapters (lora.py): the tokens of sequences that run with an adapter get their adapter's delta added
to the attention projections, for the whole batch at once (`lora_delta`, Punica's BGMV). Such steps run
eagerly: the compiled decode step (compiled_decode.py) takes only steps without an adapter in them.
"""

from dataclasses import dataclass

import torch

from .attention import (
    DecodeBatch,
    DecodeRows,
    PaddedDecodeBatch,
    PrefillBatch,
    build_decode_batch,
    build_padded_decode_batch,
    build_prefill_batch,
    decode_attention,
    padded_decode_attention,
    prefill_attention,
)
from .compiled_decode import CompiledDecode
from .config import EngineConfig
from .fast_layers import (
    FastLayer,
    PackedLinears,
    RotaryTable,
    choose_one_row_path,
    decoder_layer,
    fast_rms_norm,
    fused_linear,
    make_batch_invariant,
)
from .kv_cache import KVShape, PagedKVCache
from .lora import LoRABatch, lora_delta, slot_mask
from .lora_slots import LoRASlots
from .scheduler import ScheduledChunk


def check_supported(model) -> None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        layers is None
        or not hasattr(layers[0], "self_attn")
        or not hasattr(layers[0].self_attn, "q_proj")
        or not hasattr(inner, "rotary_emb")
    ):
        raise ValueError(
            f"labkit.engine runs Llama-family decoders (Llama, Mistral, Qwen2, the course model); "
            f"{type(model).__name__} has a different layout. Use its `generate` or vLLM instead."
        )


@dataclass
class ChunkRows:
    """Where one chunk's logits rows lie in the step's output: first its prompt-logprob positions (`scored`),
    then the rows it samples or verifies drafts from (`sampled`: 1 + its drafted tokens, or none)."""

    scored: slice
    sampled: slice


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each token in its own sequence
    slots: list[int]  # [T] the cache slot each token's K/V is written to
    decode: DecodeRows | None  # the sequences that feed one token this step
    prefill: PrefillBatch | None  # the sequences that feed a prompt (or a chunk of one)
    # [R] flat index of each token whose logits are needed: sampled, or scoring a prompt token
    logits_index: torch.Tensor
    rows: list[ChunkRows]  # per chunk, in chunk order: its rows of the [R, vocab] logits
    # every token is one sequence's next token and its logits row, in order (R == T): the compiled path's step
    plain_decode: bool
    lora: LoRABatch | None = (
        None  # the tokens that run with an adapter, and its slot; None: none do
    )


class ModelRunner:
    def __init__(
        self,
        model,
        cache: PagedKVCache,
        config: EngineConfig | None = None,
        loras: LoRASlots | None = None,
    ):
        check_supported(model)
        self.model, self.cache, self.loras = model, cache, loras
        self.shape: KVShape = cache.shape
        self.block_size = cache.block_size
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        attn = model.model.layers[0].self_attn
        self.scale = getattr(attn, "scaling", self.shape.head_dim**-0.5)
        self.device = next(model.parameters()).device
        inner = model.model
        dtype = next(model.parameters()).dtype
        self.layers = [FastLayer(layer) for layer in inner.layers]
        self.rotary = RotaryTable(inner.rotary_emb, self.shape.max_context, dtype, self.device)
        self.final_norm = fast_rms_norm(inner.norm)
        # on a CPU the [vocab, hidden] output layer is the largest matmul of a decode step: pre-pack it too
        head = fused_linear([model.lm_head])
        self.lm_head = lambda x: head(x)[0]
        packed = [lin for layer in self.layers for lin in layer.packed]
        packed += [head] if isinstance(head, PackedLinears) else []
        config = config or EngineConfig()
        if config.batch_invariant:  # one kernel for every row count
            self.one_row_path = make_batch_invariant(packed)
        else:  # batch-1 decode: MKL's F.linear or oneDNN's packed weight, whichever streams faster here
            self.one_row_path = choose_one_row_path(packed)
        # plain decode steps through one compiled graph per padded batch size (compiled_decode.py)
        self.compiled = None
        if not (config.enforce_eager or config.batch_invariant):
            self.compiled = CompiledDecode(self, config.max_num_seqs, config.compile_after_steps)

    def run(self, step: StepInput) -> torch.Tensor:
        """logits [R, vocab] for the step: compiled where it is a plain decode step of a compiled size,
        else the eager `forward` (prefill, mixed steps, drafts to verify, prompt logprobs, adapters)."""
        if self.compiled and step.lora is None and self.compiled.takes(step):
            return self.compiled.run(step)
        return self.forward(step)

    def prepare(self, chunks: list[ScheduledChunk]) -> StepInput:
        """The step's flat batch from the scheduler's chunks (each: a sequence's tokens from `start`).
        Decode chunks (1 token) and prefill chunks are attended separately: decode reads the cache in place,
        prefill gathers (so a long prompt does not make every decode token pay for padded queries).
        The logits rows come out in chunk order: a chunk's prompt-logprob positions, then its sampled
        position (with speculative decoding, the positions verifying its drafted tokens too; see
        LLMEngine.step)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_index: list[int] = []
        rows: list[ChunkRows] = []
        decode = DecodeRows([], [], [])  # one token per sequence
        # prefill: a prompt or a chunk of one
        pre_index: list[int] = []
        pre_starts: list[int] = []
        pre_lengths: list[int] = []
        pre_tables: list[list[int]] = []
        lora_rows: list[int] = []  # flat indices of the tokens that run with an adapter
        lora_slots: list[int] = []  # and each one's slot (lora_slots.py)
        for chunk in chunks:
            start, table, first = chunk.start, chunk.seq.block_table, len(ids)
            for j, t in enumerate(chunk.token_ids):
                ids.append(t)
                pos.append(start + j)
                slots.append(table[(start + j) // bs] * bs + (start + j) % bs)
            if chunk.seq.lora is not None and self.loras is not None:
                lora_rows += range(first, len(ids))
                lora_slots += [self.loras.running_slot(chunk.seq.lora)] * chunk.num_tokens
            row = len(logits_index)
            logits_index += [first + p - start for p in chunk.prompt_logprob_positions]
            scored_end = len(logits_index)
            logits_index += range(len(ids) - chunk.num_sampling_rows, len(ids))
            rows.append(ChunkRows(slice(row, scored_end), slice(scored_end, len(logits_index))))
            if chunk.num_tokens == 1:
                decode.token_index.append(first)
                decode.context_lens.append(start + 1)
                decode.tables.append(table)
            else:
                pre_index += range(first, first + chunk.num_tokens)
                pre_starts.append(start)
                pre_lengths.append(chunk.num_tokens)
                pre_tables.append(table)
        prefill = (
            build_prefill_batch(pre_index, pre_starts, pre_lengths, pre_tables, bs, self.device)
            if pre_index
            else None
        )
        return StepInput(
            self._longs(ids),
            self._longs(pos),
            slots,
            decode if decode.token_index else None,
            prefill,
            self._longs(logits_index),
            rows,
            plain_decode=prefill is None and logits_index == list(range(len(ids))),
            lora=self.lora_batch(lora_rows, lora_slots, len(ids)),
        )

    def lora_batch(self, rows: list[int], slots: list[int], num_tokens: int) -> LoRABatch | None:
        if not rows or self.loras is None:
            return None
        mask = slot_mask(
            self._longs(slots), self.loras.max_loras, self.loras.max_rank, self.loras.dtype
        )
        return LoRABatch(None if len(rows) == num_tokens else self._longs(rows), mask)

    def _longs(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Run all tokens, write their K/V into the cache, return logits [R, vocab] at logits_index.
        The eager reference; pure decode steps can run compiled instead (compiled_decode.py)."""
        hidden = self.model.model.embed_tokens(step.input_ids)  # [T, hidden]
        cos, sin = self.rotary(hidden, step.positions)  # [T, 1, head_dim] each
        cache_index = self.cache.write_index(self._longs(step.slots))
        decode = self.decode_batch(step.decode) if step.decode else None

        def attend(i: int, q, k, v):  # q [T, H, D], k and v [T, Hkv, D] -> [T, H, D]
            self.cache.write(i, cache_index, k, v)
            return self.attention(i, q, decode, step.prefill)

        hidden = self.layers_forward(hidden, cos, sin, attend, step.lora)
        return self.lm_head(self.final_norm(hidden[step.logits_index]))

    def layers_forward(
        self, hidden, cos, sin, attend, lora: LoRABatch | None = None, one_layer=None
    ) -> torch.Tensor:
        """hidden [T, hidden] through every decoder layer; attend(layer, q, k, v) stores this step's K/V and
        attends (eager: the cache write and the attention kernels; compiled: one custom op). With `lora`,
        its tokens get their adapters' deltas on the attention projections. `one_layer` runs each layer
        instead of `decoder_layer` (the compiled step passes it compiled once for all layers)."""
        for i, layer in enumerate(self.layers):
            hidden = (one_layer or decoder_layer)(self, i, layer, hidden, cos, sin, attend, lora)
        return hidden

    def adapt(self, lora: LoRABatch, layer: int, module: str, x, y) -> torch.Tensor:
        """y [T, out] (the base projection of x [T, in]) plus the adapters' deltas on lora.rows."""
        assert self.loras is not None
        a, b_t = self.loras.a[layer, module], self.loras.b[layer, module]
        if lora.rows is None:  # every token has an adapter
            return y + lora_delta(x, a, b_t, lora.mask)
        return y.index_add(0, lora.rows, lora_delta(x[lora.rows], a, b_t, lora.mask))

    def decode_batch(self, rows: DecodeRows) -> DecodeBatch | PaddedDecodeBatch:
        """The step's decode indices: ragged bags for a float cache, padded tables for a quantized one
        (attention.py)."""
        if self.cache.quantized:
            return build_padded_decode_batch(
                rows.token_index, rows.context_lens, rows.tables, self.block_size, self.device
            )
        s = self.shape
        return build_decode_batch(
            rows.token_index,
            rows.context_lens,
            rows.tables,
            self.num_heads,
            s.num_kv_heads,
            self.cache.num_blocks,
            self.block_size,
            s.head_dim,
            self.device,
        )

    def attention(
        self,
        i: int,
        q,
        decode: DecodeBatch | PaddedDecodeBatch | None,
        prefill: PrefillBatch | None,
    ):
        """Layer i's attention for the step's queries q [T, H, D], over the cache (this step's K/V written)."""
        if prefill is None and decode is not None:
            # the common step: every token is a decode token, in flat-batch order
            return self.decode_attention(i, q, decode)
        out = torch.empty_like(q)
        if decode is not None:
            d = decode.token_index
            out[d] = self.decode_attention(i, q[d], decode)
        if prefill is not None:
            p = prefill.token_index
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]
            out[p] = prefill_attention(
                q[p], k_cache, v_cache, prefill, self.scale, *self.cache.scales(i)
            )
        return out

    def decode_attention(self, i: int, q, decode: DecodeBatch | PaddedDecodeBatch):
        k_cache, v_cache = self.cache.k[i], self.cache.v[i]
        if isinstance(decode, PaddedDecodeBatch):
            return padded_decode_attention(
                q,
                k_cache,
                v_cache,
                decode.tables,
                decode.context_lens,
                self.scale,
                *self.cache.scales(i),
            )
        return decode_attention(q, k_cache, v_cache, decode, self.scale)
