"""Bit-packing: store b-bit integers densely in int32 words, exactly as GPTQ checkpoints do.

A 4-bit weight stored in an int8 tensor is no smaller than 8-bit: the saving only becomes real when
32/b values share one 32-bit word. GPTQ packs a continuous little-endian bit stream along one axis:
value i occupies bits [i*b, (i+1)*b) of the stream, word k holds stream bits [32k, 32k+32). For 2, 4 and
8 bits every value sits inside one word (value j of word k at bit j*b); for 3 bits, 32 values fill 3 words
and two of them straddle a word boundary. One formula handles all widths:

    qweight: int32 [in_features * b / 32, out_features]  codes packed along the input dimension
    qzeros:  int32 [n_groups, out_features * b / 32]      zero points packed along the output dimension
    scales:  fp16  [n_groups, out_features]
    g_idx:   int32 [in_features]                          group of each input column

The original GPTQ ("v1", checkpoint_format "gptq") stores zero - 1 in qzeros; its kernels add the 1 back.
We do the same so vLLM, transformers and GPTQModel read our files as they read theirs.
"""

import torch

_WORD = 32
_U32 = 0xFFFFFFFF


def _check(n: int, bits: int):
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be from 1 to 8, got {bits}")
    if (n * bits) % _WORD:
        raise ValueError(
            f"{n} values of {bits} bits do not fill whole 32-bit words; "
            f"need n * bits divisible by 32 (n a multiple of {_WORD // _gcd(bits, _WORD)})"
        )


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _positions(n: int, bits: int, device):
    pos = torch.arange(n, device=device, dtype=torch.int64) * bits
    return pos // _WORD, (pos % _WORD)[:, None]


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] (each in [0, 2^b)) along dim 0 into int32 words [n * b / 32, m]."""
    n, m = q.shape
    _check(n, bits)
    q = q.to(torch.int64)
    if q.min() < 0 or q.max() >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    word, off = _positions(n, bits, q.device)
    out = torch.zeros(n * bits // _WORD + 1, m, dtype=torch.int64, device=q.device)
    out.index_add_(0, word, (q << off) & _U32)  # the bits that land in this word
    out.index_add_(0, word + 1, q >> (_WORD - off))  # the overflow into the next word (3-bit)
    out = out[:-1]
    # reinterpret as signed int32
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 words [n * b / 32, m] -> int32 codes [n, m]."""
    _check(n, bits)
    if packed.shape[0] != n * bits // _WORD:
        raise ValueError(
            f"expected {n * bits // _WORD} packed rows for {n} values of {bits} bits, got {packed.shape[0]}"
        )
    # 2/4/8 bits: no value straddles words, so shift every word 32/b times at once
    if _WORD % bits == 0:
        shifts = torch.arange(0, _WORD, bits, device=packed.device, dtype=torch.int32)
        # sign bits are masked away
        vals = (packed[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
        return vals.reshape(n, packed.shape[1])
    w = packed.to(torch.int64) & _U32
    w = torch.cat([w, torch.zeros_like(w[:1])])
    word, off = _positions(n, bits, packed.device)
    vals = (w[word] >> off) | (w[word + 1] << (_WORD - off))
    return (vals & (2**bits - 1)).to(torch.int32)


def pack_gptq(
    q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict:
    """GPTQ tensors from codes q [out, in], zero and scale [out, n_groups] and g_idx [in]."""
    zero_v1 = (zero.round().to(torch.int64) - 1) & (2**bits - 1)  # v1 convention: store zero - 1
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),
        "qzeros": pack_rows(zero_v1.contiguous(), bits).t().contiguous(),
        "scales": scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight, qzeros, scales, g_idx, bits: int):
    """-> (q [out, in], zero [out, n_groups], scale [out, n_groups], g_idx): undoes pack_gptq."""
    in_f = g_idx.numel()
    out_f = scales.shape[1]
    q = unpack_rows(qweight, bits, in_f).t()
    zero = (unpack_rows(qzeros.t().contiguous(), bits, out_f) + 1) & (2**bits - 1)
    return q, zero.float(), scales.t().float(), g_idx


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """The float weight [out, in] that a GPTQ layer computes with."""
    q, zero, scale, g_idx = unpack_gptq(qweight, qzeros, scales, g_idx, bits)
    idx = g_idx.long()
    return (q.float() - zero[:, idx]) * scale[:, idx]
