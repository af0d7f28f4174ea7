"""The numbers of weight quantization: blocks, scales, zero points and bit packing (numpy only).

    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> q = NBitsWeight.quantize(lambda a, b: w[a:b], 8, 64, bits=4, block_size=32, symmetric=False)
    >>> q.b.shape, q.scales.shape        # [N, k_blocks, block_size * bits / 8], [N, k_blocks]
    ((8, 2, 16), (8, 2))
    >>> bool(np.abs(q.dequantize() - w).max() < 0.5)
    True

The layouts are those of ONNX Runtime's contrib ops (`MatMulNBits`, `GatherBlockQuantized`,
`DynamicQuantizeMatMul`); `pgexport.exporters.quant_graph` puts them into the graphs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pgexport.errors import PgExportError

CHUNK_BYTES = 64 << 20  # fp32 rows quantized at a time (bounds the peak memory on big tables)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or not _is_power_of_two(block_size):
        raise PgExportError(f"block size {block_size!r} is not a power of two >= 16 (16, 32, 64, 128, ...)")
    return block_size


def linear_block_size(block_size: int, k: int) -> int:
    """The block of a linear layer with `k` inputs: the export's, but never more than the next power
    of two >= k (>= 16), so a narrow matrix gets one block per row and a row is never padded past
    that power of two (at block 128, a 64-wide layer would otherwise store twice its weights)."""
    fit = 16
    while fit < k:
        fit *= 2
    return min(block_size, fit)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Rows of `w` `[N, K]` quantized in blocks along K.

    Returns (q uint8 `[N, k_blocks, block_size]` unpacked values in [0, 2^bits), scales float32
    `[N, k_blocks]`, zero points uint8 `[N, k_blocks]` (all 2^(bits-1) when symmetric)).
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    kb = -(-k // block_size)
    if k % block_size:
        w = np.concatenate([w, np.zeros((n, kb * block_size - k), np.float32)], axis=1)
    wb = w.reshape(n, kb, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        idx = np.abs(wb).argmax(-1)[..., None]
        scale = np.take_along_axis(wb, idx, -1)[..., 0] / -(1 << (bits - 1))
        zp = np.full((n, kb), 1 << (bits - 1), np.float32)
    else:
        lo = np.minimum(wb.min(-1), 0.0)
        hi = np.maximum(wb.max(-1), 0.0)
        scale = (hi - lo) / qmax
        zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, qmax)
    scale = scale.astype(np.float32)
    inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale)).astype(np.float32)
    q = np.clip(np.round(wb * inv[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return q, scale, zp.astype(np.uint8)


def pack_bits(q: np.ndarray, bits: int, pad_value: int = 0) -> np.ndarray:
    """Pack values < 2^bits along the last axis into uint8, low-order bits first (8 bits: as is);
    a last byte left incomplete is filled with `pad_value`."""
    q = np.asarray(q, np.uint8)
    if bits == 8:
        return q
    per = 8 // bits
    pad = (-q.shape[-1]) % per
    if pad:
        q = np.concatenate([q, np.full(q.shape[:-1] + (pad,), pad_value, np.uint8)], axis=-1)
    q = q.reshape(*q.shape[:-1], -1, per)
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per):
        out |= q[..., i] << np.uint8(bits * i)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values along the last axis."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    vals = np.stack([(packed >> np.uint8(bits * i)) & mask for i in range(per)], axis=-1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int,
                     k: int) -> np.ndarray:
    """MatMulNBits' weight `[N, K]` back in float32 (the reference the tests compare with)."""
    n, kb, _ = b.shape
    q = unpack_bits(b, bits, block_size).astype(np.float32)  # [N, kb, block]
    scales = scales.reshape(n, kb)
    zp = np.full((n, kb), 1 << (bits - 1), np.float32) if zero_points is None else \
        unpack_bits(zero_points.reshape(n, -1), bits, kb).astype(np.float32)
    return ((q - zp[..., None]) * scales[..., None]).reshape(n, kb * block_size)[:, :k]


class NBitsWeight:
    """A `[N, K]` matrix quantized for MatMulNBits (and GatherBlockQuantized when K % block == 0)."""

    def __init__(self, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, k: int):
        self.b, self.scales, self.zero_points = b, scales, zero_points
        self.bits, self.block_size, self.k = bits, block_size, k

    @classmethod
    def quantize(cls, rows: Callable[[int, int], np.ndarray], n: int, k: int, bits: int, block_size: int,
                 symmetric: bool) -> "NBitsWeight":
        """`rows(start, stop)` gives rows `[stop - start, K]` of the float matrix (read in chunks)."""
        kb = -(-k // block_size)
        blob = block_size * bits // 8
        b = np.empty((n, kb, blob), np.uint8)
        scales = np.empty((n, kb), np.float32)
        zps = None if symmetric else np.empty((n, -(-kb * bits // 8)), np.uint8)
        step = max(1, CHUNK_BYTES // max(1, 4 * kb * block_size))
        for start in range(0, n, step):
            stop = min(n, start + step)
            q, s, zp = quantize_blocks(rows(start, stop), bits, block_size, symmetric)
            b[start:stop] = pack_bits(q, bits)
            scales[start:stop] = s
            if zps is not None:  # padded with the default zero point, as ONNX Runtime's quantizer does
                zps[start:stop] = pack_bits(zp, bits, pad_value=1 << (bits - 1))
        return cls(b, scales, zps, bits, block_size, k)

    def dequantize(self) -> np.ndarray:
        return dequantize_nbits(self.b, self.scales, self.zero_points, self.bits, self.block_size, self.k)


# Symmetric int8 weights for DynamicQuantizeMatMul use 7 bits, [-64, 64] (ONNX Runtime's
# `reduce_range`). On x86 CPUs without VNNI (AVX2, AVX512 before VNNI) the uint8 x int8 kernel
# multiplies with VPMADDUBSW, which adds two uint8 * int8 products into a saturating int16: with
# full-range weights 2 * 255 * 127 overflows it and the layer's output is wrong (visibly so in
# real logits); 2 * 255 * 64 fits. The same file then runs correctly on every CPU, at the same
# speed (the kernel does not change), for one bit of weight resolution.
DYNAMIC_INT8_MAX = 64


def quantize_columns_int8(w: np.ndarray, symmetric: bool):
    """`w` `[K, N]` -> (int8 or uint8 `[K, N]`, scale `[N]`, zero point `[N]` or None): one scale per
    output column, for DynamicQuantizeMatMul. Symmetric: int8 in [-DYNAMIC_INT8_MAX, DYNAMIC_INT8_MAX];
    asymmetric: uint8 with zero points (the uint8 x uint8 kernel, which cannot saturate)."""
    w = np.asarray(w, np.float32)
    if symmetric:
        scale = (np.abs(w).max(0) / DYNAMIC_INT8_MAX).astype(np.float32)
        inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
        q = np.clip(np.round(w * inv), -DYNAMIC_INT8_MAX, DYNAMIC_INT8_MAX)
        return q.astype(np.int8), scale, None
    lo, hi = np.minimum(w.min(0), 0.0), np.maximum(w.max(0), 0.0)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
    zp = np.clip(np.round(-lo * inv), 0, 255)
    return np.clip(np.round(w * inv) + zp, 0, 255).astype(np.uint8), scale, zp.astype(np.uint8)


def quantize_channels_int8(w: np.ndarray):
    """`w` `[O, ...]` -> (int8 `w.shape`, float32 scale `[O]`): symmetric, one scale per output channel."""
    w = np.asarray(w, np.float32)
    flat = w.reshape(w.shape[0], -1)
    scale = (np.abs(flat).max(1) / 127.0).astype(np.float32)
    inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
    q = np.clip(np.round(flat * inv[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale
