"""int8 / int4 weight quantization of an exported ONNX folder (a post-pass over the fp32 graphs).

    >>> from pgexport.exporters.quantize import QuantOptions, quantize_folder
    >>> info = quantize_folder("exports/tmp-fp32", QuantOptions.create("int4"))  # doctest: +SKIP
    >>> info["bytes_after"] / info["bytes_before"]  # doctest: +SKIP
    0.135

`export_folder(..., quant="int4")` (`pgexport onnx --quant int4`) runs it on the freshly traced
fp32 folder, inside its temporary folder, before the manifest is written and the export is
validated. Only weights change: the graphs' inputs, outputs and activations stay float32.

What is quantized, in all three graphs (numpy only, no torch, no onnxruntime):

* every `MatMul` with a constant 2-D weight (SigLIP attention and MLP, the projector, Gemma
  attention and MLP; the exporter stores them pre-transposed, `[K=in, N=out]`):
  - int4, and int8 with `int8_format="nbits"`: `com.microsoft.MatMulNBits` (bits 4 or 8), the
    weight transposed to `[N, K]` and quantized in blocks of `block_size` along K (a layer with
    fewer inputs uses the next power of two >= K instead, `linear_block_size`; K padded with
    zeros to a whole block), packed `[N, k_blocks, block_size * bits / 8]` uint8, 4-bit values
    low nibble first; scales `[N, k_blocks]` float32; zero points (asymmetric only) packed the
    same way, `[N, ceil(k_blocks * bits / 8)]` uint8;
  - int8 with `int8_format="dynamic"`: `com.microsoft.DynamicQuantizeMatMul` (the fused op
    `onnxruntime.quantization.quantize_dynamic` emits: the activations are quantized to uint8 per
    call, int8 x uint8 GEMM, VNNI on recent CPUs), the weight kept `[K, N]` int8 with one scale
    per output column (uint8 + zero points when asymmetric); `block_size` does not apply to it;
* the tied embedding table, read by the lookup `Gather` and by the LM head `Gemm(transB=1)`:
  ONE block-quantized table `[vocab, hidden]` quantized along hidden. The head becomes
  `MatMulNBits` (B = the table as `[vocab, k_blocks, blob]`, N=vocab, K=hidden) and the lookup
  `com.microsoft.GatherBlockQuantized` (data = the same bytes as `[vocab, hidden * bits / 8]`,
  the same scales and zero points initializers). The two data initializers differ in shape
  only, so the writer stores the bytes once and both point at the same offset and length of
  the data file. `head_bits=8` keeps that table at 8 bits when 4 bits cost the head accuracy.

The SigLIP patch-embedding convolution (not a MatMul) gets int8 weights with one scale per output
channel, read through `DequantizeLinear` (whatever the bits of the rest). With
DynamicQuantizeMatMul, a MatMul whose only consumer adds a bias vector takes that bias as the
op's `bias` input (the Add goes; MatMulNBits + Add is left to ONNX Runtime's own fusion).
Left in float32 (recorded in the manifest): the position embedding, norm weights, biases, and any
matrix an op other than those above reads (e.g. a fused `com.microsoft.Attention`: quantized
exports are traced without ONNX Runtime fusions).
prefill.onnx and decode.onnx still share `decoder.onnx.data`: quantized tensors are computed
once per source tensor and written once (content hash, as the exporter does); every tensor
starts on a 64-byte boundary.

Symmetric quantization follows ONNX Runtime's own quantizer: the block's largest-magnitude value
maps to -2^(bits-1) (scale = that value / -2^(bits-1)), no zero-point tensor (the ops' default
2^(bits-1) applies). Asymmetric: the block's range (extended to include 0) over 2^bits - 1 steps,
with a zero point per block. Either way a linear weight's B, scales and zero points are byte for
byte what `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` writes at the
same block size (tested);
ours exists because that quantizer skips the tied head (it reads the table through
`Gemm(transB=1)`, not a constant MatMul weight), has no shared lookup table, and loads each
graph's weights whole instead of streaming them into one deduplicated data file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pgexport.errors import PgExportError

MS_DOMAIN = "com.microsoft"
QUANTS = {"int8": 8, "int4": 4}
INT8_FORMATS = ("nbits", "dynamic")
TARGETS = ("cpu", "cuda")
# Defaults, chosen by measurement (README "Quantization"):
# - block 128 for int4 and int8. int4 at 128 rather than 32: at the 3B geometry it decodes at 0.86x
#   onnxruntime-genai's int4 build (benchmarks/results/quant_baselines.md; block 32: 0.93x in an
#   earlier run), and side by side it decodes in 0.83x and prefills in 0.74x block 32's time, 16%
#   smaller; on the trained demo model it keeps the int4 gates (against fp32, 500 test images:
#   teacher-forced top-1 96.8%, exact match 0.4 and IoU 0.9 points lost; block 32: 97.6%, 0.2,
#   0.9; benchmarks/results/quant_demo.md). int8: 99.3% top-1 with DynamicQuantizeMatMul, 99.6%
#   MatMulNBits;
DEFAULT_BLOCK_SIZE = {4: 128, 8: 128}
# - int4 asymmetric, for 1/32 bit per weight more at block 128: on the demo model symmetric agrees
#   a little more often on top-1 (97.1% vs 96.9% on 2000 test images) but loses more task accuracy
#   (exact match 0.55 vs 0.24 points, IoU 0.70 vs 0.65; on 500 images IoU 1.36 vs 0.87;
#   benchmarks/results/quant_demo_2000.md): the zero point keeps the box coordinates;
#   int8 symmetric (DynamicQuantizeMatMul with zero points runs 2.1x slower over 260 rows and
#   1.7x over one, benchmarks/results/matmul_kernels*.md);
DEFAULT_SYMMETRIC = {4: False, 8: True}
# - int8 on CPU: DynamicQuantizeMatMul (fastest); on CUDA: MatMulNBits (the CUDA provider runs
#   the dynamic-quantization ops on the CPU);
DEFAULT_INT8_FORMAT = {"cpu": "dynamic", "cuda": "nbits"}
# - accuracy_level 4 (int8 activations inside MatMulNBits on CPU): 8-bit MatMulNBits has no
#   other fast CPU kernel (level 0 dequantizes the whole weight each call, ~100x slower).
DEFAULT_ACCURACY_LEVEL = 4
EXTERNAL_THRESHOLD_BYTES = 64  # smaller initializers stay inline (as in the exporter)
ALIGN = 64  # every external tensor starts at a multiple of this offset
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


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize; `create` fills the defaults and checks the values."""

    bits: int  # 4 or 8: the linear layers
    block_size: int  # MatMulNBits / GatherBlockQuantized block along K (power of two >= 16)
    symmetric: bool
    accuracy_level: int  # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    int8_format: str  # bits 8 only: "nbits" (MatMulNBits) or "dynamic" (DynamicQuantizeMatMul)
    head_bits: int  # bits of the shared embedding / LM-head table (4 or 8)
    target: str  # provider the defaults were chosen for: "cpu" or "cuda"

    @classmethod
    def create(cls, quant: str, block_size: int | None = None, symmetric: bool | None = None,
               accuracy_level: int | None = None, int8_format: str | None = None, head_bits: int | None = None,
               target: str = "cpu") -> "QuantOptions":
        quant = str(quant).lower()
        if quant not in QUANTS:
            raise PgExportError(f"unknown quantization {quant!r}; choose int8 or int4")
        bits = QUANTS[quant]
        if target not in TARGETS:
            raise PgExportError(f"unknown target {target!r}; choose cpu or cuda")
        block_size = check_block_size(DEFAULT_BLOCK_SIZE[bits] if block_size is None else block_size)
        if accuracy_level is None:
            accuracy_level = DEFAULT_ACCURACY_LEVEL
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise PgExportError(f"accuracy level {accuracy_level!r} is not one of 0, 1, 2, 3, 4")
        if int8_format is None:
            int8_format = DEFAULT_INT8_FORMAT[target] if bits == 8 else "nbits"
        if int8_format not in INT8_FORMATS:
            raise PgExportError(f"unknown int8 format {int8_format!r}; choose nbits or dynamic")
        if bits == 4 and int8_format != "nbits":
            raise PgExportError("the dynamic int8 format applies to --quant int8 only")
        head_bits = bits if head_bits is None else head_bits
        if head_bits not in (4, 8) or head_bits < bits:
            raise PgExportError(f"head bits {head_bits!r} must be 4 or 8 and not below the {bits} bits of the layers")
        if symmetric is None:
            symmetric = DEFAULT_SYMMETRIC[bits]
        return cls(bits, block_size, bool(symmetric), int(accuracy_level), int8_format, int(head_bits), target)

    @property
    def name(self) -> str:
        return f"int{self.bits}"


# ---------------------------------------------------------------------------- the arithmetic
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


def quantize_columns_int8(w: np.ndarray, symmetric: bool):
    """`w` `[K, N]` -> (int8 or uint8 `[K, N]`, scale `[N]`, zero point `[N]` or None): one scale per
    output column, for DynamicQuantizeMatMul."""
    w = np.asarray(w, np.float32)
    if symmetric:
        scale = (np.abs(w).max(0) / 127.0).astype(np.float32)
        inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
        return np.clip(np.round(w * inv), -127, 127).astype(np.int8), scale, None
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


# ---------------------------------------------------------------------------- the data file
class _DataWriter:
    """One external-data file: each distinct tensor (by dtype, length and SHA-256) written once."""

    def __init__(self, path: Path):
        self.path, self.location = path, path.name
        self.file = open(path, "wb")
        self.size = 0
        self.by_content: dict[tuple, tuple[int, int]] = {}

    def write(self, data_type: int, raw: np.ndarray) -> tuple[int, int]:
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        key = (data_type, raw.nbytes, hashlib.sha256(memoryview(raw)).hexdigest())
        where = self.by_content.get(key)
        if where is None:
            if self.size % ALIGN:
                pad = ALIGN - self.size % ALIGN
                self.file.write(b"\0" * pad)
                self.size += pad
            self.file.write(memoryview(raw))
            where = self.by_content[key] = (self.size, raw.nbytes)
            self.size += raw.nbytes
        return where

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


# ---------------------------------------------------------------------------- the graph rewrite
class _Reader:
    """Float initializers of the original (fp32) graphs, read from their data files on demand.

    The files are memory-mapped; `release` drops a tensor's pages from this process once it has
    been quantized or copied (they stay in the page cache and fault back in if read again).
    Without it every page read stays mapped until the end, and the process's RSS grows by the
    whole fp32 file on top of what the quantizer allocates (measured at 3B: int8 peak RSS 18.5 GiB
    with 8.9 GiB of it private)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.maps: dict[str, mmap.mmap] = {}

    def key(self, tensor) -> tuple:
        import onnx

        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            return ("ext", info["location"], int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0))
        return ("inline", tensor.name, id(tensor))

    def _map(self, location: str) -> mmap.mmap:
        if location not in self.maps:
            with open(self.folder / location, "rb") as f:
                self.maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[location]

    def array(self, tensor) -> np.ndarray:
        """The initializer's values (a read-only view of the mapped file for external data)."""
        import onnx
        from onnx import numpy_helper

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        _, location, offset, length = self.key(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = length // np.dtype(dtype).itemsize
        return np.frombuffer(self._map(location), dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))

    def raw(self, tensor) -> np.ndarray:
        """The initializer's bytes as stored (external or inline), uint8."""
        import onnx

        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _, location, offset, length = self.key(tensor)
            return np.frombuffer(self._map(location), dtype=np.uint8, count=length, offset=offset)
        if tensor.HasField("raw_data"):
            return np.frombuffer(tensor.raw_data, np.uint8)
        return np.ascontiguousarray(self.array(tensor)).reshape(-1).view(np.uint8)

    def release(self, tensor) -> None:
        """Unmap the pages of an external tensor from this process (best effort, Linux/macOS)."""
        key = self.key(tensor)
        if key[0] != "ext" or key[1] not in self.maps or not key[3] or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, location, offset, length = key
        start = offset - offset % mmap.PAGESIZE  # madvise wants a page-aligned start
        self.maps[location].madvise(mmap.MADV_DONTNEED, start, length + offset - start)

    def close(self) -> None:
        self.maps.clear()


class _GraphQuantizer:
    """Rewrites the graphs of one data file (vision; or prefill + decode, which share quantized
    tensors through `cache`)."""

    def __init__(self, options: QuantOptions, reader: _Reader, say):
        self.o, self.reader, self.say = options, reader, say
        self.cache: dict[tuple, dict] = {}  # (source key, kind) -> {suffix: np.ndarray}
        self.counts: dict[str, int] = {}
        self.unquantized: dict[str, list[int]] = {}  # name -> shape
        self.notes: list[str] = []

    # -- helpers
    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _nbits(self, tensor, bits: int, block_size: int, transpose: bool) -> NBitsWeight:
        key = (self.reader.key(tensor), "nbits", bits, block_size, self.o.symmetric, transpose)
        hit = self.cache.get(key)
        if hit is None:
            w = self.reader.array(tensor)
            if transpose:  # [K, N] as MatMul reads it -> rows of W^T
                k, n = w.shape
                hit = NBitsWeight.quantize(lambda a, b: np.ascontiguousarray(w[:, a:b].T), n, k, bits, block_size,
                                           self.o.symmetric)
            else:
                n, k = w.shape
                hit = NBitsWeight.quantize(lambda a, b: np.asarray(w[a:b]), n, k, bits, block_size, self.o.symmetric)
            self.cache[key] = hit
            self.reader.release(tensor)
        return hit

    def _int8_columns(self, tensor):
        key = (self.reader.key(tensor), "dynamic", self.o.symmetric)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = quantize_columns_int8(self.reader.array(tensor), self.o.symmetric)
            self.reader.release(tensor)
        return hit

    def rewrite(self, proto) -> None:
        """Replace the quantizable nodes of `proto` (in place) and its float weights by quantized ones."""
        import onnx
        from onnx import helper, numpy_helper

        graph = proto.graph
        inits = {t.name: t for t in graph.initializer}
        uses: dict[str, list] = {}  # value name -> the nodes reading it
        for node in graph.node:
            for name in node.input:
                uses.setdefault(name, []).append(node)
        new_inits: dict[str, onnx.TensorProto] = {}
        replaced: set[str] = set()  # float initializers whose every use was quantized

        def add(name: str, array: np.ndarray) -> str:
            if name not in new_inits:
                new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
            return name

        def is_float_matrix(name: str) -> bool:
            t = inits.get(name)
            return t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2

        # The tied table: a float matrix read by Gather(axis 0) and/or Gemm(transB=1) heads.
        tables = {}
        for name, nodes in uses.items():
            if not is_float_matrix(name):
                continue
            kinds = [self._table_use(n, name) for n in nodes]
            if all(kinds) and nodes:
                tables[name] = kinds
        def is_linear(node) -> bool:  # a MatMul by a float weight read by it alone: quantized below
            return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and is_float_matrix(node.input[1]) \
                and node.input[0] not in inits and len(uses[node.input[1]]) == 1

        # id(linear node) -> the Add of its bias, folded into DynamicQuantizeMatMul only: ONNX Runtime
        # fuses MatMulNBits + Add itself where the execution provider's kernel takes a bias (its
        # CUDA kernel's bias support depends on the version), but not an Add after DynamicQuantizeMatMul.
        dynamic = self.o.bits == 8 and self.o.int8_format == "dynamic"
        bias_adds = self._bias_adds([n for n in graph.node if is_linear(n)], uses, inits, graph) if dynamic else {}
        folded = {id(a) for a, _ in bias_adds.values()}
        new_nodes = []
        for node in graph.node:
            out = None
            if id(node) in folded:
                continue  # its bias is an input of the quantized node that replaced its MatMul
            if is_linear(node):
                out = self._matmul(node, inits[node.input[1]], add, bias_adds.get(id(node)))
            elif any(i in tables for i in node.input):
                name = next(i for i in node.input if i in tables)
                out = self._table_node(node, inits[name], add)
            elif node.op_type == "Conv" and node.domain in ("", "ai.onnx") and len(node.input) > 1 \
                    and node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT \
                    and len(inits[node.input[1]].dims) >= 3 and len(uses[node.input[1]]) == 1:
                out = self._conv(node, inits[node.input[1]], add)
            if out is None:
                out = onnx.NodeProto()
                out.CopyFrom(node)  # a copy: the repeated field is cleared below
            new_nodes += out if isinstance(out, list) else [out]
        del graph.node[:]
        graph.node.extend(new_nodes)
        still_used = {i for n in graph.node for i in n.input}
        for t in list(graph.initializer):
            if t.name not in still_used:
                replaced.add(t.name)
        kept = []
        for t in graph.initializer:
            if t.name in still_used:
                kept.append(onnx.TensorProto())
                kept[-1].CopyFrom(t)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.initializer.extend(new_inits.values())
        readers = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, set()).add(f"{n.domain + '.' if n.domain else ''}{n.op_type}")
        for t in kept:
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 2:
                self.unquantized[t.name] = list(t.dims)
                fused = sorted(r for r in readers.get(t.name, ()) if r.startswith(MS_DOMAIN))
                if fused:
                    self._note(f"{t.name} {list(t.dims)} is read by {', '.join(fused)} and stays float32 "
                               "(export without ONNX Runtime fusions to quantize it)")
        if not any(op.domain == MS_DOMAIN for op in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    def _conv(self, node, tensor, add) -> list:
        """Conv weight (SigLIP's patch embedding) -> int8, one scale per output channel, read through
        DequantizeLinear: 4x smaller, error ~1/254 of each channel's range (the op has no N-bit form)."""
        import onnx
        from onnx import helper

        key = (self.reader.key(tensor), "conv8")
        hit = self.cache.get(key)
        if hit is None:
            w = np.asarray(self.reader.array(tensor), np.float32)
            hit = self.cache[key] = quantize_channels_int8(w)
            self.reader.release(tensor)
        q, scale = hit
        weight = f"{tensor.name}.int8"
        dq = helper.make_node("DequantizeLinear", [add(weight, q), add(f"{tensor.name}.scale", scale)],
                              [f"{tensor.name}.dequantized"], name=f"{node.name}_weight_dq", axis=0)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[1] = dq.output[0]
        self._count("Conv (int8 weight, DequantizeLinear)")
        return [dq, conv]

    @staticmethod
    def _table_use(node, name: str) -> str | None:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] == name \
                and (attrs.get("axis") is None or attrs["axis"].i == 0):
            return "lookup"
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) >= 2 and node.input[1] == name \
                and node.input[0] != name and (len(node.input) < 3 or not node.input[2]) \
                and attrs.get("transB") is not None and attrs["transB"].i == 1 \
                and (attrs.get("transA") is None or attrs["transA"].i == 0) \
                and (attrs.get("alpha") is None or attrs["alpha"].f == 1.0):
            return "head"
        return None

    @staticmethod
    def _bias_adds(linear: list, uses: dict[str, list], inits: dict, graph) -> dict:
        """id(MatMul) -> (Add node, bias name) for the `linear` MatMuls (those being quantized;
        `uses`: value name -> the nodes reading it) whose only consumer adds a float
        vector of its output width (SigLIP's and the projector's biases). DynamicQuantizeMatMul
        takes that bias as an input; left as an Add, it costs a pass over the output, and ONNX
        Runtime then fuses it into the tanh-Gelu that follows fc1 (FastGelu), which ran slower
        here than the plain Gelu (int8 vision encoder, 3B geometry: 351.9 vs 341.3 ms folded;
        quantize_dynamic's graph 339.2 ms, whose bias ONNX Runtime folds into
        MatMulIntegerToFloat)."""
        import onnx

        outputs = {o.name for o in graph.output}
        found = {}
        for node in linear:
            y = node.output[0]
            users = uses.get(y, [])
            if y in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
                continue
            add_node = users[0]
            other = add_node.input[1] if add_node.input[0] == y else add_node.input[0]
            bias, w = inits.get(other), inits[node.input[1]]
            if bias is not None and bias.data_type == onnx.TensorProto.FLOAT and list(bias.dims) == [w.dims[-1]]:
                found[id(node)] = (add_node, other)
        return found

    def _matmul(self, node, tensor, add, bias_add=None):
        """The quantized node for MatMul `node` (weight `tensor` [K, N]); with `bias_add` (Add node,
        bias name) it also adds the bias and writes the Add's output."""
        from onnx import helper

        k, n = (int(d) for d in tensor.dims)
        o = self.o
        outputs, bias = (list(node.output), None) if bias_add is None else (list(bias_add[0].output), bias_add[1])
        if bias is not None:
            self._note("a linear layer's bias (float32) is an input of its DynamicQuantizeMatMul, not a separate Add")
        if o.bits == 8 and o.int8_format == "dynamic":
            q, scale, zp = self._int8_columns(tensor)
            inputs = [node.input[0], add(f"{tensor.name}.int8", q), add(f"{tensor.name}.scale", scale)]
            inputs.append(add(f"{tensor.name}.zero_point", zp) if zp is not None else "")
            if bias is not None:
                inputs.append(bias)
            self._count("DynamicQuantizeMatMul")
            return helper.make_node("DynamicQuantizeMatMul", _trim(inputs), outputs, name=f"{node.name}_int8",
                                    domain=MS_DOMAIN)
        block = linear_block_size(o.block_size, k)
        if block != o.block_size:
            self._note(f"matrices with fewer than {o.block_size} inputs use one block per row (the next power of two "
                       f">= their K, e.g. {block} for K {k}) instead of a {o.block_size}-block padded with zeros")
        w = self._nbits(tensor, o.bits, block, transpose=True)
        self._count(f"MatMulNBits{o.bits}")
        return self._nbits_node(node.input[0], outputs, node.name, tensor.name, w, add, k, n)

    def _nbits_node(self, a: str, outputs, node_name: str, base: str, w: NBitsWeight, add, k: int, n: int,
                    b_name: str | None = None):
        from onnx import helper

        tag = f"q{w.bits}"
        inputs = [a, add(b_name or f"{base}.{tag}", w.b), add(f"{base}.{tag}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(add(f"{base}.{tag}.zero_points", w.zero_points))
        return helper.make_node("MatMulNBits", inputs, list(outputs), name=f"{node_name}_nbits", domain=MS_DOMAIN,
                                K=k, N=n, bits=w.bits, block_size=w.block_size, accuracy_level=self.o.accuracy_level)

    def table_block_size(self, hidden: int) -> int | None:
        """The table's block: the export's, or the largest power of two >= 16 below it that divides
        hidden (lookup and head share bytes only without padding); None if there is none."""
        b = self.o.block_size
        while b >= 16:
            if hidden % b == 0:
                return b
            b //= 2
        return None

    def _table_node(self, node, tensor, add):
        from onnx import helper

        vocab, hidden = (int(d) for d in tensor.dims)
        block = self.table_block_size(hidden)
        if block is None:
            self._note(f"{tensor.name} [{vocab}, {hidden}] left in float32: hidden {hidden} has no power-of-two "
                              "block >= 16")
            return None
        if block != self.o.block_size:
            self._note(f"{tensor.name}: block size {block} (hidden {hidden} is not a multiple of {self.o.block_size})")
        bits = self.o.head_bits
        w = self._nbits(tensor, bits, block, transpose=False)
        tag = f"q{bits}"
        if self._table_use(node, tensor.name) == "head":
            self._count(f"MatMulNBits{bits} (head)")
            return self._nbits_node(node.input[0], node.output, node.name, tensor.name, w, add, hidden, vocab,
                                    b_name=f"{tensor.name}.{tag}.blocks")
        # lookup: same bytes as [vocab, hidden * bits / 8], same scales and zero points
        inputs = [add(f"{tensor.name}.{tag}", w.b.reshape(vocab, -1)), node.input[1],
                  add(f"{tensor.name}.{tag}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(add(f"{tensor.name}.{tag}.zero_points", w.zero_points))
        self._count(f"GatherBlockQuantized{bits}")
        return helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{node.name}_q{bits}",
                                domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)


def _trim(inputs: list[str]) -> list[str]:
    """Node inputs without the trailing empty names of optional inputs left out."""
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def _externalize(proto, reader: _Reader, writer: _DataWriter) -> None:
    """Point every initializer of `proto` of at least EXTERNAL_THRESHOLD_BYTES into `writer`."""
    import onnx

    for t in proto.graph.initializer:
        raw = reader.raw(t)
        if raw.nbytes < EXTERNAL_THRESHOLD_BYTES:
            if t.data_location == onnx.TensorProto.EXTERNAL:  # pragma: no cover - the exporter inlines these
                t.raw_data = raw.tobytes()
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            continue
        offset, length = writer.write(t.data_type, raw)
        reader.release(t)
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(field)
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", writer.location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value


def _graph_groups(folder: Path) -> list[tuple[str, list[Path]]]:
    """(data file, graphs that use it) for the folder's ONNX files, each graph in one group."""
    from pgexport.onnx_files import check_external_data

    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.onnx")):
        locations = sorted({r.location for r in check_external_data(path)})
        if len(locations) > 1:
            raise PgExportError(f"{path.name} reads {len(locations)} data files; the quantizer expects one per graph")
        groups.setdefault(locations[0] if locations else f"{path.name}.data", []).append(path)
    # prefill before decode, so the shared tensors are laid out in the order prefill reads them
    order = {"vision_encoder.onnx": 0, "prefill.onnx": 1, "decode.onnx": 2}
    return [(loc, sorted(paths, key=lambda p: (order.get(p.name, 9), p.name))) for loc, paths in groups.items()]


def folder_model_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the ONNX graphs and their data files in `folder` (what a runtime loads)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx.data")))


def quantize_folder(folder: str | os.PathLike, options: QuantOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Quantize the fp32 ONNX graphs of `folder` in place (see the module docstring).

    Returns the manifest's `quantization` entry (`describe`) plus `bytes_before` / `bytes_after`
    (graphs + data files). On failure the folder is left as it was.
    """
    import onnx

    say = progress or (lambda _m: None)
    folder = Path(folder)
    before = folder_model_bytes(folder)
    groups = _graph_groups(folder)
    if not groups:
        raise PgExportError(f"{folder} holds no ONNX graph to quantize")
    for _, paths in groups:
        for path in paths:
            proto = onnx.load(str(path), load_external_data=False)
            if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
                raise PgExportError(f"{path.name} holds float16 weights; int8 / int4 quantization starts from a float32 "
                                    "export (pgexport onnx --quant int8|int4 does that)")
            if any(n.domain == MS_DOMAIN and n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized")
                   for n in proto.graph.node):
                raise PgExportError(f"{path.name} is already quantized")
    original = folder / ".fp32"
    original.mkdir()
    moved: list[str] = []
    written: list[Path] = []
    quantizers = []
    try:
        for location, paths in groups:
            for name in [p.name for p in paths] + [location]:
                if (folder / name).exists():
                    os.replace(folder / name, original / name)
                    moved.append(name)
        for location, paths in groups:
            reader = _Reader(original)
            writer = _DataWriter(folder / location)
            written.append(folder / location)
            q = _GraphQuantizer(options, reader, say)
            quantizers.append(q)
            try:
                for path in paths:
                    say(f"quantizing {path.name} ({options.name}, block {options.block_size})")
                    proto = onnx.load(str(original / path.name), load_external_data=False)
                    q.rewrite(proto)
                    _externalize(proto, reader, writer)
                    onnx.save(proto, str(folder / path.name))
                    written.append(folder / path.name)
            finally:
                writer.close()
                reader.close()
        for location, paths in groups:
            for path in paths:
                onnx.checker.check_model(str(folder / path.name))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for name in moved:
            os.replace(original / name, folder / name)
        shutil.rmtree(original, ignore_errors=True)
        raise
    shutil.rmtree(original, ignore_errors=True)
    after = folder_model_bytes(folder)
    info = describe(options, quantizers)
    info["bytes_before"], info["bytes_after"] = before, after
    say(f"quantized: {after / 2**20:.2f} MiB of graphs and weights, {after / before:.3f}x the fp32 export")
    return info


def describe(options: QuantOptions, quantizers: list[_GraphQuantizer]) -> dict:
    """The manifest's `quantization` object."""
    counts: dict[str, int] = {}
    unquantized: dict[str, list[int]] = {}
    notes: list[str] = []
    for q in quantizers:
        for k, v in q.counts.items():
            counts[k] = counts.get(k, 0) + v
        unquantized.update(q.unquantized)
        notes += [n for n in q.notes if n not in notes]
    o = options
    linear = ("com.microsoft.DynamicQuantizeMatMul (int8 per output column, activations quantized per call)"
              if o.bits == 8 and o.int8_format == "dynamic" else f"com.microsoft.MatMulNBits (bits {o.bits})")
    d = {
        "method": "weight-only",
        "bits": o.bits,
        "block_size": o.block_size,
        "symmetric": o.symmetric,
        "accuracy_level": o.accuracy_level,
        "int8_format": o.int8_format if o.bits == 8 else None,
        "head_bits": o.head_bits,
        "target": o.target,
        "scales_dtype": "float32",
        "linear": linear,
        "embedding": (f"com.microsoft.GatherBlockQuantized (bits {o.head_bits}), table shared with the LM head"
                      if any(k.startswith("GatherBlockQuantized") for k in counts) else "float32 (not quantized)"),
        "head": (f"com.microsoft.MatMulNBits (bits {o.head_bits}) on the embedding table"
                 if any(k.endswith("(head)") for k in counts) else "float32 (not quantized)"),
        "conv": "int8 per output channel through DequantizeLinear",
        "nodes": dict(sorted(counts.items())),
        "unquantized": {
            "float_matrices": dict(sorted(unquantized.items())),
            "also": "norm weights, biases and other 1-D tensors stay float32",
        },
        "notes": notes,
    }
    return d


def simulate(state: dict[str, np.ndarray], options: QuantOptions, table: str = "language_model.embed_tokens.weight",
             keep: tuple[str, ...] = ("position_embedding",)) -> dict[str, np.ndarray]:
    """The weights an export with `options` computes with, dequantized back to float32.

    `state` maps parameter names to float arrays (a PaliGemma state dict as numpy). Every 2-D
    weight (`[out, in]`, the linear layers) is quantized and dequantized as the export stores it,
    the tied table as the shared embedding/head table, convolution weights as int8 per output
    channel; the rest (and names containing one of `keep`) is returned unchanged. Loading the result into the eager model gives a float "twin" of
    the quantized export: with accuracy_level 1 (float32 activations) ONNX Runtime matches it to
    float rounding, so packing, scales and zero points can be checked exactly.
    """
    out = {}
    for name, w in state.items():
        w = np.asarray(w)
        if w.ndim >= 3 and w.dtype == np.float32:  # convolution: int8 per output channel
            q, scale = quantize_channels_int8(w)
            out[name] = q.astype(np.float32) * scale.reshape(-1, *([1] * (w.ndim - 1)))
        elif w.ndim != 2 or any(k in name for k in keep) or w.dtype != np.float32:
            out[name] = w
        elif name == table:
            q = _GraphQuantizer(options, None, None)
            block = q.table_block_size(w.shape[1])
            out[name] = w if block is None else NBitsWeight.quantize(
                lambda a, b: w[a:b], w.shape[0], w.shape[1], options.head_bits, block, options.symmetric).dequantize()
        elif options.bits == 8 and options.int8_format == "dynamic":
            q, scale, zp = quantize_columns_int8(w.T, options.symmetric)  # MatMul's [K, N]
            deq = (q.astype(np.float32) - (0 if zp is None else zp.astype(np.float32))) * scale
            out[name] = np.ascontiguousarray(deq.T)
        else:
            out[name] = NBitsWeight.quantize(lambda a, b: w[a:b], w.shape[0], w.shape[1], options.bits,
                                             linear_block_size(options.block_size, w.shape[1]), options.symmetric).dequantize()
    return out
