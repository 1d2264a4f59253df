"""A quantized KV cache: keys and values stored in 8 bits with a scale per token and head.

At long contexts the KV cache, not the weights, decides how many sequences fit (notebook 04), so storing it
in 8 bits instead of the model's 16 or 32 fits 2-4x the tokens in the same memory. vLLM's option has the
same name and values: `EngineConfig(kv_cache_dtype="int8" | "fp8_e4m3")`; "auto" keeps the model's dtype.

**Where the scales live.** Each token's key (and value) vector of one head, [head_dim] numbers, is stored as
8-bit codes and one float32 scale, its largest magnitude over the format's largest code:
    int8:      code = round(x / scale),  scale = max|x| / 127     (uniform steps: absolute error <= scale / 2)
    fp8_e4m3:  code = fp8(x / scale),    scale = max|x| / 448     (a float: relative error <= 2^-4)
Why per token and head, for both formats:
- Keys have outlier *channels* (a few head dimensions are large for every token; KIVI, Liu et al. 2024,
  Fig. 2). One scale for the whole tensor (vLLM's fp8 default, with a scale calibrated offline or 1.0)
  gives int8 steps sized for the outliers everywhere: the small channels round to a few codes. A scale per
  token still shares one step across a token's channels, but only with its own outliers, and needs no
  calibration data: it is computed as the token is written. (KIVI's per-channel key scale is more accurate
  still, but a channel's scale needs the whole block of tokens before it can be fixed: it does not fit a
  cache that is written one token at a time.)
- fp8 is a float format: its relative precision is the same at any magnitude, so a per-tensor scale would
  only have to avoid overflow (e4m3 saturates at 448). Per token it costs the same 4 bytes per 64 codes as
  int8's and removes the overflow question altogether, with one code path for both formats.
The scales cost 4 bytes per head_dim codes (6% at head_dim 64); `bytes_per_token` counts them, so the
engine's memory budget (kv_cache.default_num_blocks) buys as many blocks as really fit.

**Where they are dequantized.** Attention gathers the blocks a sequence reads and dequantizes only those
(attention.py: `prefill_attention` and `padded_decode_attention`, the latter also inside the compiled decode
step), as a GPU kernel would do in registers; the full-precision cache never exists. The eager decode kernel
`decode_attention` reads float blocks in place with `embedding_bag`, which takes no 8-bit table, so a
quantized cache's decode steps run the padded kernel instead (model_runner.py).
"""

from dataclasses import dataclass

import torch

from .kv_cache import KVShape, PagedKVCache, kv_bytes_per_token

SCALE_DTYPE = torch.float32  # one scale per (token, head) for K and one for V


@dataclass(frozen=True)
class KVFormat:
    """How a quantized cache stores one element: the storage dtype and the largest code's magnitude."""

    name: str  # vLLM's spelling of the --kv-cache-dtype value
    dtype: torch.dtype
    max_code: float  # 127 for int8, 448 for e4m3 (its largest finite value)
    integer: bool  # round to the nearest integer (int8); a float format rounds in the cast (fp8)


FORMATS = {
    "int8": KVFormat("int8", torch.int8, 127.0, True),
    "fp8_e4m3": KVFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0, False),
}
KV_CACHE_DTYPES = ("auto", *FORMATS)  # the string values EngineConfig.kv_cache_dtype takes


def kv_format(kv_cache_dtype) -> KVFormat | None:
    """The quantized format a kv_cache_dtype names, or None for a float cache ("auto" or a torch.dtype)."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return None
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)} or a float torch.dtype, "
            f"got {kv_cache_dtype!r}"
        )
    return FORMATS.get(kv_cache_dtype)


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> codes [..., head_dim] in fmt.dtype and scales [...] (float32), one per vector."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(SCALE_DTYPE)
    # an all-zero vector (the zero-initialised cache, a padding row) keeps a tiny scale, never 0 / 0
    scale = (amax / fmt.max_code).clamp(min=torch.finfo(SCALE_DTYPE).tiny)
    scaled = x.to(SCALE_DTYPE) / scale
    if fmt.integer:
        scaled = scaled.round()
    codes = scaled.clamp(-fmt.max_code, fmt.max_code).to(fmt.dtype)
    return codes, scale.squeeze(-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim] and their scales [...] -> values [..., head_dim] in `dtype`."""
    return (codes.to(SCALE_DTYPE) * scale[..., None]).to(dtype)


def bytes_per_token(shape: KVShape, kv_cache_dtype, model_dtype: torch.dtype) -> int:
    """KV bytes one token takes in every layer, scales included: what the memory budget divides."""
    fmt = kv_format(kv_cache_dtype)
    if fmt is None:
        dtype = model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
        return kv_bytes_per_token(shape, dtype)
    code_bytes = shape.head_dim * fmt.dtype.itemsize
    return 2 * shape.num_layers * shape.num_kv_heads * (code_bytes + SCALE_DTYPE.itemsize)


def make_cache(
    shape: KVShape,
    num_blocks: int,
    block_size: int,
    kv_cache_dtype,
    model_dtype: torch.dtype,
    device,
) -> PagedKVCache:
    """The engine's cache for a kv_cache_dtype: a float PagedKVCache, or a QuantizedKVCache."""
    fmt = kv_format(kv_cache_dtype)
    if fmt is not None:
        return QuantizedKVCache(shape, num_blocks, block_size, fmt, device)
    dtype = model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    return PagedKVCache(shape, num_blocks, block_size, dtype, device)


class QuantizedKVCache(PagedKVCache):
    """PagedKVCache's layout holding 8-bit codes, plus per layer the scales of every slot:
        k_scale[layer][head, slot], v_scale[layer][head, slot]      ([kv_heads, num_blocks * block_size])
    Writes quantize; readers (attention.py) gather codes and scales together and dequantize."""

    quantized = True

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, fmt: KVFormat, device):
        super().__init__(shape, num_blocks, block_size, fmt.dtype, device)
        self.format = fmt
        slots = (shape.num_kv_heads, num_blocks * block_size)

        def scales():
            return [torch.ones(slots, dtype=SCALE_DTYPE, device=device) for _ in self.k]

        self.k_scale, self.v_scale = scales(), scales()

    def write(
        self, layer: int, index: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ):
        """Quantize this step's k, v [T, kv_heads, head_dim] and store codes and scales [T, kv_heads]."""
        k_codes, k_scale = quantize(k, self.format)
        v_codes, v_scale = quantize(v, self.format)
        # PagedKVCache.write's index_copy_, on the codes' bytes: it has no fp8 kernel on a CPU
        h = self.shape.num_kv_heads
        k_bytes, v_bytes = self.k[layer].view(torch.uint8), self.v[layer].view(torch.uint8)
        k_bytes.view(h, -1).index_copy_(
            1, index[0], k_codes.view(torch.uint8).transpose(0, 1).reshape(h, -1)
        )
        v_bytes.index_copy_(1, index[1], v_codes.view(torch.uint8).transpose(0, 1))
        self.k_scale[layer].index_copy_(1, index[1], k_scale.t())
        self.v_scale[layer].index_copy_(1, index[1], v_scale.t())

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies the scales along with the codes."""
        super().copy_blocks(copies)
        if not copies:
            return
        src, dst = (torch.tensor(x, device=self.k[0].device) for x in zip(*copies))
        offsets = torch.arange(self.block_size, device=src.device)
        src_slots = (src[:, None] * self.block_size + offsets).reshape(-1)
        dst_slots = (dst[:, None] * self.block_size + offsets).reshape(-1)
        for scale in self.k_scale + self.v_scale:
            scale[:, dst_slots] = scale[:, src_slots]

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.k_scale[layer], self.v_scale[layer]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return super().tensors + self.k_scale + self.v_scale
