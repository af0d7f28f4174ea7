"""The graph rewrite of weight quantization: float MatMuls, the tied table and the patch
convolution replaced by ONNX Runtime's quantized ops (see `pgexport.exporters.quantize` for what
is quantized and how). Works on `onnx.ModelProto`s whose weights stay in their data files until
each one is read, quantized and released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pgexport.exporters.external_data import EXTERNAL_THRESHOLD_BYTES, DataFile, ExternalDataReader
from pgexport.exporters.quant_numerics import (NBitsWeight, linear_block_size, quantize_channels_int8,
                                              quantize_columns_int8)

if TYPE_CHECKING:  # options are passed in by the driver; a type only, no import cycle
    from pgexport.exporters.quantize import QuantOptions

MS_DOMAIN = "com.microsoft"
ALIGN = 64  # every external tensor starts at a multiple of this offset


class GraphQuantizer:
    """Rewrites the graphs of one data file (vision; or prefill + decode, which share quantized
    tensors through `cache`)."""

    def __init__(self, options: QuantOptions, reader: ExternalDataReader, say):
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

        graph = proto.graph
        self.opset = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 0)
        inits = {t.name: t for t in graph.initializer}
        uses: dict[str, list] = {}  # value name -> the nodes reading it
        for node in graph.node:
            for name in node.input:
                uses.setdefault(name, []).append(node)
        new_inits: dict[str, onnx.TensorProto] = {}

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
        Runtime then fuses it into the tanh-Gelu that follows fc1 (FastGelu), which runs slower on
        the CPU than the plain Gelu (quantize_dynamic's graphs avoid it the same way: ONNX Runtime
        folds their bias into MatMulIntegerToFloat)."""

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
            return helper.make_node("DynamicQuantizeMatMul", trim(inputs), outputs, name=f"{node.name}_int8",
                                    domain=MS_DOMAIN)
        if o.bits == 8 and o.int8_format == "rowwise":
            return self._rowwise(node, tensor, add)
        block = linear_block_size(o.block_size, k)
        if block != o.block_size:
            self._note(f"matrices with fewer than {o.block_size} inputs use one block per row (the next power of two "
                       f">= their K, e.g. {block} for K {k}) instead of a {o.block_size}-block padded with zeros")
        w = self._nbits(tensor, o.bits, block, transpose=True)
        self._count(f"MatMulNBits{o.bits}")
        return self._nbits_node(node.input[0], outputs, node.name, tensor.name, w, add, k, n)

    def _rowwise(self, node, tensor, add) -> list:
        """MatMul `node` as int8 with its activations quantized per row: each row (token) of
        x [..., K] gets its own symmetric scale, max|x| / 127, so a row's result never depends on
        the other rows of the batch (DynamicQuantizeMatMul takes one scale for the whole call).
        The weight is DynamicQuantizeMatMul's ([K, N] int8 in 7 bits with a scale per column, or
        uint8 + zero points); the rounded activations are shifted by 128 into uint8 for
        MatMulInteger's uint8 x int8 kernel (VNNI), whose int32 sums are exact:

            s = max(ReduceMax(|x|, -1) / 127, tiny)                      # [..., 1]
            y = Cast(MatMulInteger(Round(x / s) + 128, Wq, 128, zp)) * s * w_scale

        ONNX Runtime fuses neither end into one op, so this is eleven plain nodes around the GEMM:
        cheap beside it (docs/quantization.md has the measured cost)."""
        q, scale, zp = self._int8_columns(tensor)
        x, base = node.input[0], tensor.name
        c = "int8_rowwise"  # constants shared by every rewritten MatMul of the graph
        add(f"{c}.127", np.array(127.0, np.float32))
        add(f"{c}.tiny", np.array(np.finfo(np.float32).tiny, np.float32))
        add(f"{c}.128", np.array(128.0, np.float32))
        add(f"{c}.zero_point", np.array(128, np.uint8))
        t = f"{node.output[0]}_rowwise"  # names of the new values (value names are unique, node names need not be)
        if self.opset >= 18:
            reduce = helper.make_node("ReduceMax", [f"{t}.abs", add(f"{c}.axes", np.array([-1], np.int64))],
                                      [f"{t}.max"], name=f"{t}_max", keepdims=1)
        else:
            reduce = helper.make_node("ReduceMax", [f"{t}.abs"], [f"{t}.max"], name=f"{t}_max", axes=[-1], keepdims=1)
        b_inputs = [add(f"{base}.int8", q)]
        if zp is not None:
            b_inputs.append(add(f"{base}.zero_point", zp))
        self._count("MatMulInteger (int8, activations per row)")
        return [
            helper.make_node("Abs", [x], [f"{t}.abs"], name=f"{t}_abs"),
            reduce,
            helper.make_node("Div", [f"{t}.max", f"{c}.127"], [f"{t}.s0"], name=f"{t}_scale"),
            helper.make_node("Max", [f"{t}.s0", f"{c}.tiny"], [f"{t}.scale"], name=f"{t}_scale_floor"),
            helper.make_node("Div", [x, f"{t}.scale"], [f"{t}.scaled"], name=f"{t}_div"),
            helper.make_node("Round", [f"{t}.scaled"], [f"{t}.round"], name=f"{t}_round"),
            helper.make_node("Add", [f"{t}.round", f"{c}.128"], [f"{t}.shift"], name=f"{t}_shift"),
            helper.make_node("Cast", [f"{t}.shift"], [f"{t}.q"], name=f"{t}_cast", to=onnx.TensorProto.UINT8),
            helper.make_node("MatMulInteger", [f"{t}.q", b_inputs[0], f"{c}.zero_point", *b_inputs[1:]],
                             [f"{t}.int32"], name=f"{t}_matmul"),
            helper.make_node("Cast", [f"{t}.int32"], [f"{t}.float"], name=f"{t}_float", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{t}.float", f"{t}.scale"], [f"{t}.rows"], name=f"{t}_rescale_rows"),
            helper.make_node("Mul", [f"{t}.rows", add(f"{base}.scale", scale)], list(node.output),
                             name=f"{t}_rescale_columns"),
        ]

    def _nbits_node(self, a: str, outputs, node_name: str, base: str, w: NBitsWeight, add, k: int, n: int,
                    b_name: str | None = None):

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


def trim(inputs: list[str]) -> list[str]:
    """Node inputs without the trailing empty names of optional inputs left out."""
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def externalize(proto, reader: ExternalDataReader, writer: DataFile) -> None:
    """Point every initializer of `proto` of at least EXTERNAL_THRESHOLD_BYTES into `writer`."""

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
