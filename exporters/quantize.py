"""int8 / int4 weight quantization of an exported ONNX folder (a post-pass over the fp32 graphs).

    >>> from pgexport.exporters.quantize import QuantOptions, quantize_folder
    >>> info = quantize_folder("exports/tmp-fp32", QuantOptions.create("int4"))  # doctest: +SKIP

`export_folder(..., quant="int4")` (`pgexport onnx --quant int4`) runs it on the freshly traced
fp32 folder, inside its temporary folder, before the manifest is written and the export is
validated. Only weights change: the graphs' inputs, outputs and activations stay float32.

The code is in three files: `quant_numerics` (blocks, scales, packing), `quant_graph` (the node
and initializer rewrite) and this one (options and the folder driver). What is quantized, in all
three graphs (numpy and onnx only, no torch, no onnxruntime):

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
    per output column, in 7 bits ([-64, 64]: full-range weights overflow the kernel's 16-bit sums
    on CPUs without VNNI, see `quant_numerics.DYNAMIC_INT8_MAX`), or uint8 + zero points when
    asymmetric; `block_size` does not apply to it;
  - int8 with `int8_format="rowwise"`: the same weight, read by a plain `MatMulInteger` whose
    activations are quantized per row (token) with a symmetric scale of their own (eleven standard
    nodes around it, `quant_graph.GraphQuantizer._rowwise`): a row's result does not depend on
    the other rows of the batch, which DynamicQuantizeMatMul's one scale per call cannot promise
    (what the continuous-batching engine needs for answers that do not depend on the load);
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

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from pgexport.errors import PgExportError
from pgexport.exporters.external_data import DataFile, ExternalDataReader
from pgexport.exporters.quant_graph import ALIGN, MS_DOMAIN, GraphQuantizer, externalize
from pgexport.exporters.quant_numerics import (NBitsWeight, check_block_size, linear_block_size,
                                              quantize_channels_int8, quantize_columns_int8)
from pgexport.runtime.onnx_files import check_external_data

QUANTS = {"int8": 8, "int4": 4}
INT8_FORMATS = ("nbits", "dynamic", "rowwise")
TARGETS = ("cpu", "cuda")
# Defaults, each chosen by measurement on the 3B geometry and the demo model (the figures:
# docs/quantization.md and benchmarks/results/quant_baselines.md, quant_demo*.md, matmul_kernels*.md):
# - block 128: faster than 32 in prefill and decode, smaller, and within the demo model's gates;
DEFAULT_BLOCK_SIZE = {4: 128, 8: 128}
# - int4 asymmetric: the zero point costs 1/32 bit per weight at block 128 and keeps the box
#   coordinates of detection answers; int8 symmetric: DynamicQuantizeMatMul with zero points is
#   markedly slower;
DEFAULT_SYMMETRIC = {4: False, 8: True}
# - int8 on CPU: DynamicQuantizeMatMul (fastest); on CUDA: MatMulNBits (the CUDA provider runs
#   the dynamic-quantization ops on the CPU);
DEFAULT_INT8_FORMAT = {"cpu": "dynamic", "cuda": "nbits"}
# - accuracy_level 4 (int8 activations inside MatMulNBits on CPU): 8-bit MatMulNBits has no
#   other fast CPU kernel (level 0 dequantizes the whole weight on every call).
DEFAULT_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize; `create` fills the defaults and checks the values."""

    bits: int  # 4 or 8: the linear layers
    block_size: int  # MatMulNBits / GatherBlockQuantized block along K (power of two >= 16)
    symmetric: bool
    accuracy_level: int  # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    int8_format: str  # bits 8 only: "nbits" (MatMulNBits), "dynamic" (DynamicQuantizeMatMul) or
    # "rowwise" (MatMulInteger, activations quantized per row: batch-invariant)
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
            raise PgExportError(f"unknown int8 format {int8_format!r}; choose nbits, dynamic or rowwise")
        if bits == 4 and int8_format != "nbits":
            raise PgExportError(f"the {int8_format} int8 format applies to --quant int8 only")
        head_bits = bits if head_bits is None else head_bits
        if head_bits not in (4, 8) or head_bits < bits:
            raise PgExportError(f"head bits {head_bits!r} must be 4 or 8 and not below the {bits} bits of the layers")
        if symmetric is None:
            symmetric = DEFAULT_SYMMETRIC[bits]
        return cls(bits, block_size, bool(symmetric), int(accuracy_level), int8_format, int(head_bits), target)

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def _graph_groups(folder: Path) -> list[tuple[str, list[Path]]]:
    """(data file, graphs that use it) for the folder's ONNX files, each graph in one group."""

    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.onnx")):
        locations = sorted({r.location for r in check_external_data(path)})
        if len(locations) > 1:
            raise PgExportError(f"{path.name} reads {len(locations)} data files; the quantizer expects one per graph")
        groups.setdefault(locations[0] if locations else f"{path.name}.data", []).append(path)
    # prefill before decode, so the shared tensors are laid out in the order prefill reads them
    order = {"vision_encoder.onnx": 0, "prefill.onnx": 1, "decode.onnx": 2, "decoder.onnx": 3}
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
            reader = ExternalDataReader(original)
            writer = DataFile(folder / location, align=ALIGN)
            written.append(folder / location)
            q = GraphQuantizer(options, reader, say)
            quantizers.append(q)
            try:
                for path in paths:
                    say(f"quantizing {path.name} ({options.name}, block {options.block_size})")
                    proto = onnx.load(str(original / path.name), load_external_data=False)
                    q.rewrite(proto)
                    externalize(proto, reader, writer)
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


def describe(options: QuantOptions, quantizers: list[GraphQuantizer]) -> dict:
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
    if o.bits == 8 and o.int8_format == "dynamic":
        linear = ("com.microsoft.DynamicQuantizeMatMul (int8 per output column, 7-bit range when symmetric, "
                  "activations quantized per call)")
    elif o.bits == 8 and o.int8_format == "rowwise":
        linear = ("MatMulInteger (int8 per output column, 7-bit range when symmetric, activations quantized per "
                  "row with their own scale: a row's result does not depend on the batch)")
    else:
        linear = f"com.microsoft.MatMulNBits (bits {o.bits})"
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
            q = GraphQuantizer(options, None, None)
            block = q.table_block_size(w.shape[1])
            out[name] = w if block is None else NBitsWeight.quantize(
                lambda a, b: w[a:b], w.shape[0], w.shape[1], options.head_bits, block, options.symmetric).dequantize()
        elif options.bits == 8 and options.int8_format in ("dynamic", "rowwise"):
            q, scale, zp = quantize_columns_int8(w.T, options.symmetric)  # MatMul's [K, N]
            deq = (q.astype(np.float32) - (0 if zp is None else zp.astype(np.float32))) * scale
            out[name] = np.ascontiguousarray(deq.T)
        else:
            out[name] = NBitsWeight.quantize(lambda a, b: w[a:b], w.shape[0], w.shape[1], options.bits,
                                             linear_block_size(options.block_size, w.shape[1]), options.symmetric).dequantize()
    return out
