"""Export a PaliGemma to three ONNX graphs that share one decoder weight file.

    >>> from pgexport.exporters.onnx_export import export_onnx
    >>> info = export_onnx(model, "exports/paligemma-tiny")  # doctest: +SKIP
    >>> info = export_onnx("checkpoints/paligemma-3b-pt-224", "exports/pg3b-fp16", dtype="float16")  # doctest: +SKIP
    >>> sorted(info["files"])  # doctest: +SKIP
    ['config.json', 'decode.onnx', 'decoder.onnx.data', 'prefill.onnx', 'vision_encoder.onnx', 'vision_encoder.onnx.data']

Layout of the output folder:

    config.json               the model's Hugging Face config (geometry, special ids)
    vision_encoder.onnx       + vision_encoder.onnx.data
    prefill.onnx, decode.onnx + decoder.onnx.data, ONE file both graphs point into

Pipeline, one code path whatever `model` is:

1. Structure. A weightless copy of the model (fake tensors, at the export dtype) is traced by
   `torch.onnx.export(dynamo=True)` through each wrapper of `graphs.py`. Tracing reads no weight,
   so it costs the same few hundred MB for a tiny model and for 28B. Traced graphs are kept in
   a cache keyed by architecture (`trace_cache.py`): another export of the same geometry skips
   this step and writes the same files.
2. Weights. Every initializer named after a parameter is bound to a lazy tensor that reads that
   parameter from a `TensorSource` (`tensor_source.py`): the in-memory model's state dict, or the
   checkpoint folder's safetensors files read tensor by tensor. `Transpose(weight)` nodes (every
   linear layer: MatMul reads `[in, out]`) become lazily pre-transposed initializers named
   `<param>.transpose`, so the files hold the layout MatMul reads and the runtime folds nothing.
   The tied embedding is read by a Gather and by the LM head's `Gemm(transB=1)`, never
   transposed, so it is stored once.
3. The onnxscript optimizer folds the small constants (Gemma's `1 + w` norm weights, named
   `<param>.add`, shape arithmetic) and removes dead code; it never reads a large weight.
4. Writing. Each initializer of at least 64 bytes goes to external data: a weight is read from
   the source, transformed, hashed, appended to the data file (unless the same bytes are already
   there) and released before the next one, so the peak memory is the graph plus about one tensor
   (the 2 GB embedding table at 3B fp32). Prefill and decode point into the same
   `decoder.onnx.data`: a parameter both graphs use is read and written once.

Everything is written to a temporary folder next to `out_dir`, checked with
`onnx.checker.check_model(path)`, checked for external-data locations that stay inside the
folder, and renamed into place at the end, so a failed export leaves no half-written folder.

`dtype="float16"` stores the weights in fp16 and runs the graphs in fp16, except where accuracy
needs fp32: RMSNorm (computed in fp32 by the model), attention scores, soft-caps and softmax
(`models/attention.py`'s fp16 path), the final logit soft-cap, and the `logits` output, which is
float32 in every export. `pixel_values` is float32 too; `image_features` and the KV cache are fp16.
ONNX Runtime's CPU execution provider runs fp16 graphs, but on x86 it has no fp16 kernels for
MatMul, Gemm, Softmax and the elementwise ops: it inserts Casts and computes them in fp32, and
converts the fp16 weights to fp32 copies when a session loads (the files are half the fp32
size, the session's memory is not). So on CPU an fp16 export saves disk and download, not memory
or time; it is meant for GPU providers. Its CPU outputs are within fp16 rounding of eager fp32
(tests/test_onnx_export.py). Export time and peak memory at the 3B geometry:
benchmarks/results/onnx_fp32.md.
"""

from __future__ import annotations

import logging
import re
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch

from pgexport.errors import PgExportError
from pgexport.exporters.external_data import EXTERNAL_THRESHOLD_BYTES, DataFile
from pgexport.files import move_into_place, staging_folder
from pgexport.models.config import PaliGemmaConfig
from pgexport.models.paligemma import PaliGemma
from pgexport.runtime.onnx_files import check_external_data

from pgexport.exporters.graphs import DecodeGraph, DecoderGraph, PrefillGraph, VisionEncoderGraph
from pgexport.exporters.tensor_source import CheckpointSource, StateDictSource, TensorSource
from pgexport.exporters.trace_cache import traced

DEFAULT_OPSET = 20  # Gelu(approximate="tanh") is a single op from opset 20
VISION_FILE = "vision_encoder.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
DECODER_FILE = "decoder.onnx"  # prefill + decode in one graph (one session holds the weights once)
VISION_DATA = "vision_encoder.onnx.data"
DECODER_DATA = "decoder.onnx.data"  # shared by prefill.onnx, decode.onnx and decoder.onnx
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PARAM_PREFIX = "model."  # the wrappers hold the model as `self.model`


def export_onnx(
    model: PaliGemma | str | os.PathLike,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    dtype: str = "float32",
    ort_fusions: bool = False,
) -> dict:
    """Export `model` to `out_dir`; returns what was written (paths, sizes, tensor counts).

    `model` is a `PaliGemma` in memory, or the path of a Hugging Face checkpoint folder, whose
    weights are then streamed from its safetensors files without loading the model. `dtype` is
    the dtype of the exported weights and graphs ("float32" or "float16"), whatever the dtype the
    weights come in. `ort_fusions=True` fuses the fp32 vision encoder's attention and LayerNorms
    into ONNX Runtime's `com.microsoft` Attention / SkipLayerNormalization ops (outputs within
    1e-5 of the unfused graph; on CPU no faster beyond the measurement noise, so off by default:
    the files then hold standard ONNX ops only). The decoder graphs are never fused: the fusions
    that apply there (MultiHeadAttention, SkipSimplifiedLayerNormalization) made prefill and
    decode slower on CPU, and ONNX Runtime fuses the RMSNorms itself at load time.

    The returned dict has `out_dir`, `files` {name: bytes}, `total_bytes`, `param_bytes` (the
    source's parameters at the dtype they are stored in), `fp32_param_bytes`, `size_ratio`
    (total / fp32 params), `tensors` (unique stored tensors per data file), `opset`, `dtype` and
    `ort_fusions` (per graph file, whether it was fused).
    """
    say = progress or (lambda _msg: None)
    if dtype not in EXPORT_DTYPES:
        raise PgExportError(f"dtype {dtype!r} cannot be exported; choose one of {', '.join(EXPORT_DTYPES)}")
    torch_dtype = EXPORT_DTYPES[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    cfg, source = open_source(model)
    if dtype == "float16" and cfg.is_paligemma2:
        warnings.warn("PaliGemma 2 (Gemma 2) activations can overflow fp16; prefer a float32 export "
                      "(or bfloat16 on a runtime that has it) and check the outputs", stacklevel=2)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fake_mode, fake = fake_model(cfg, torch_dtype)
    check_source_shapes(source, fake)
    graphs = (VisionEncoderGraph(fake), PrefillGraph(fake), DecodeGraph(fake), DecoderGraph(fake))

    tmp = staging_folder(out_dir)
    try:
        # Vision encoder: its own data file.
        say(f"exporting {VISION_FILE} ({dtype}, weights from {source.describe()})")
        vision = export_graph(graphs[0], opset, source, torch_dtype, fake_mode,
                               fusions=ort_fusions and dtype == "float32")
        say(f"writing {VISION_DATA}")
        vision_store = SharedExternalData(tmp, VISION_DATA)
        vision_store.add(vision)
        vision_store.finish()
        ir.save(vision, tmp / VISION_FILE)
        del vision, vision_store

        # Prefill, decode and the merged decoder: one data file, each distinct tensor stored once.
        # Prefill's weights are written before the others are traced; they find them in the file.
        store = SharedExternalData(tmp, DECODER_DATA)
        decoder_graphs = {}
        for name, graph in zip((PREFILL_FILE, DECODE_FILE, DECODER_FILE), graphs[1:]):
            say(f"exporting {name}")
            decoder_graphs[name] = export_graph(graph, opset, source, torch_dtype, fake_mode)
            if name == PREFILL_FILE:
                say(f"writing {DECODER_DATA}")
            store.add(decoder_graphs[name])
            store.flush()
        store.finish()
        for name, graph in decoder_graphs.items():
            ir.save(graph, tmp / name)
        del decoder_graphs, store

        cfg.to_json_file(tmp / "config.json")

        say("checking the ONNX files")
        names = (VISION_FILE, PREFILL_FILE, DECODE_FILE, DECODER_FILE)
        for name in names:
            onnx.checker.check_model(str(tmp / name))  # path form: works past 2 GB
        refs = {name: {(r.location, r.offset, r.length) for r in check_external_data(tmp / name)} for name in names}
        tensors = {VISION_DATA: len(refs[VISION_FILE]),
                   DECODER_DATA: len(refs[PREFILL_FILE] | refs[DECODE_FILE] | refs[DECODER_FILE])}

        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    total = sum(files.values())
    numel = sum(int(np.prod(s)) for s in source.shapes().values())
    info = {
        "out_dir": str(out_dir),
        "files": files,
        "total_bytes": total,
        "param_bytes": source.stored_bytes(),
        "fp32_param_bytes": numel * 4,
        "size_ratio": total / (numel * 4),
        "tensors": tensors,
        "opset": opset,
        "dtype": dtype,
        "ort_fusions": {VISION_FILE: ort_fusions and dtype == "float32", PREFILL_FILE: False, DECODE_FILE: False,
                        DECODER_FILE: False},
    }
    say(f"wrote {out_dir}: {total / 2**20:.1f} MiB, {info['size_ratio']:.3f}x the fp32 parameters")
    return info


def open_source(model: PaliGemma | str | os.PathLike) -> tuple[PaliGemmaConfig, TensorSource]:
    """(config, tensor source) for an in-memory model or a checkpoint folder."""
    if isinstance(model, PaliGemma):
        return model.cfg, StateDictSource(model.state_dict())
    if isinstance(model, (str, os.PathLike)):
        source = CheckpointSource(model)
        return source.cfg, source
    raise TypeError(f"export_onnx takes a PaliGemma or a checkpoint folder, not {type(model).__name__}")


def fake_model(cfg: PaliGemmaConfig, dtype: torch.dtype):
    """The model's structure with fake parameters (shapes and dtypes only, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` (fake tensors cannot be cast in place)
    try:
        with mode:
            model = PaliGemma(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return mode, model


def check_source_shapes(source: TensorSource, model: torch.nn.Module) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = source.shapes()
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise PgExportError(f"the weights do not match the model's config: {', '.join(diff[:3])}")


# ---------------------------------------------------------------------------- tracing
def export_graph(graph: torch.nn.Module, opset: int, source: TensorSource, dtype: torch.dtype, fake_mode,
                  fusions: bool = False) -> ir.Model:
    """Trace one wrapper (fake weights), bind its weights to `source`, optimize; returns the IR model."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    graph = graph.eval()
    ir_model = traced(graph, opset, dtype, lambda: trace_graph(graph, opset, fake_mode))
    _check_io(ir_model, graph.input_names, graph.output_names)
    _name_axes(ir_model, getattr(graph, "axis_names", {}))
    _bind_weights(ir_model, source, dtype)
    _pretranspose_weights(ir_model)
    derived = _derived_weight_names(ir_model)
    # Constant folding + dead-code elimination of the small constants. `should_fold` keeps the
    # optimizer away from nodes that read a large weight: folding one would read it into memory.
    onnxscript.optimizer.optimize_ir(ir_model, should_fold=_no_large_weight_folding)
    _rename_folded_weights(ir_model, derived)
    if fusions:
        _fuse_for_ort(ir_model)
    # The exporter annotates every node with its Python stack trace and FX node (absolute source
    # paths included): most of the graph's bytes, and nothing a runtime reads.
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()
    for value in ir_model.graph.initializers.values():
        value.metadata_props.clear()
    ir_model.producer_name = "pgexport"
    return ir_model


def trace_graph(graph: torch.nn.Module, opset: int, fake_mode) -> ir.Model:
    """`torch.onnx.export(dynamo=True)` of one wrapper; weights are fake tensors."""
    with fake_mode:
        example = graph.example_inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            dynamic_shapes=graph.dynamic_shapes(),
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    return program.model


class SourceTensor(ir.LazyTensor):
    """A weight read from a `TensorSource` on demand, with its transforms (e.g. a transpose).

    `key` identifies the bytes (parameter name, dtype, transforms): two initializers with the same
    key hold the same tensor, so the writer reads and stores it once.
    """

    __slots__ = ("source", "param", "torch_dtype", "transforms")

    def __init__(self, source: TensorSource, param: str, torch_dtype: torch.dtype, shape, transforms: tuple = (), name: str | None = None):
        self.source, self.param, self.torch_dtype, self.transforms = source, param, torch_dtype, transforms
        super().__init__(lambda: ir.Tensor(self.torch().numpy()), dtype=_IR_DTYPES[torch_dtype], shape=ir.Shape(shape), name=name)

    @property
    def key(self) -> tuple:
        return (self.param, str(self.torch_dtype), self.transforms)

    def torch(self) -> torch.Tensor:
        """The tensor's values (read from the source each time it is called)."""
        t = self.source.read(self.param, self.torch_dtype)
        for op, arg in self.transforms:
            if op != "transpose":  # pragma: no cover - only transposes are created
                raise ValueError(op)
            t = t.permute(*arg).contiguous()
        return t

    def transposed(self, perm: tuple[int, ...], name: str) -> "SourceTensor":
        shape = [self.shape[i] for i in perm]
        return SourceTensor(self.source, self.param, self.torch_dtype, shape, self.transforms + (("transpose", tuple(perm)),), name)


_IR_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16}


def _bind_weights(model: ir.Model, source: TensorSource, dtype: torch.dtype) -> None:
    """Point every parameter initializer (unbound after tracing) at the source tensor of that name."""
    shapes = source.shapes()
    for value in model.graph.initializers.values():
        name = value.name
        param = name[len(PARAM_PREFIX):] if name.startswith(PARAM_PREFIX) else None
        if param in shapes:
            if tuple(value.shape) != tuple(shapes[param]):
                raise RuntimeError(f"{name}: graph shape {value.shape} vs weight {list(shapes[param])}")
            value.const_value = SourceTensor(source, param, dtype, shapes[param], name=name)
        elif value.const_value is None:  # a weight of the traced model (`trace_cache.traced`)
            raise RuntimeError(f"initializer {name} has no weight in the source")


def _pretranspose_weights(model: ir.Model) -> None:
    """`Transpose(W)` of a weight used only there -> an initializer `W.transpose` that holds the
    transposed tensor (computed when it is written), the Transpose node removed."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[0]
        tensor = w.const_value if w is not None else None
        if not isinstance(tensor, SourceTensor) or not w.is_initializer() or len(w.uses()) != 1:
            continue
        perm = node.attributes.get("perm")
        perm = tuple(perm.as_ints()) if perm is not None else tuple(reversed(range(len(tensor.shape))))
        name = f"{w.name}.transpose"
        out = node.outputs[0]
        new = ir.Value(name=name, shape=ir.Shape([tensor.shape[i] for i in perm]), type=ir.TensorType(tensor.dtype),
                       const_value=tensor.transposed(perm, name))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.initializers.pop(w.name)


def _fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """ONNX Runtime contrib-op fusions of onnxscript (`fuse_xformers` + its ORT rewrite rules),
    without `optimize_for_ort`'s Gemm -> MatMul + Add rewrite, which would put a Transpose of the
    tied embedding (2 GB at 3B, every step) in front of the LM head."""
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions._core import ORT_PATTERN_REWRITE_RULES, fuse_xformers

    model, counts = fuse_xformers(model)
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    return counts


def _no_large_weight_folding(node: ir.Node) -> bool | None:
    for v in node.inputs:
        if v is not None and isinstance(v.const_value, SourceTensor) and v.const_value.size > onnxscript.optimizer._constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT:
            return False
    return None


def _derived_weight_names(model: ir.Model) -> dict[str, str]:
    """Names for values computed from one parameter and constants only, e.g. Gemma's `1 + w` ->
    `...weight.add` (fp16: `...weight.cast.add`), so the initializers the optimizer folds them
    into keep a readable, parameter-based name."""
    base: dict[str, str] = {v.name: v.name for v in model.graph.initializers.values() if v.name.startswith(PARAM_PREFIX)}
    for node in model.graph:  # topological order
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or len(node.outputs) != 1 or not all(v.name in base or _is_constant(v) for v in inputs):
            continue
        params = {base[v.name] for v in inputs if v.name in base}
        if len(params) == 1:
            base[node.outputs[0].name] = f"{params.pop()}.{node.op_type.lower()}"
    return {k: v for k, v in base.items() if k != v}


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _rename_folded_weights(model: ir.Model, derived: dict[str, str]) -> None:
    graph = model.graph
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for value in list(graph.initializers.values()):
        new = derived.get(value.name)
        if new is None or new in taken:
            continue
        graph.initializers.pop(value.name)
        value.name = new
        graph.register_initializer(value)
        taken.add(new)


def _name_axes(model: ir.Model, names: dict[tuple[str, int], str]) -> None:
    """Rename the symbolic dims torch.export generated (`s18`, `s41 + s85`) after the inputs
    they size, everywhere in the graph, so the file documents its own shapes."""
    inputs = {v.name: v for v in model.graph.inputs}
    symbols = {}
    for (name, axis), new in names.items():
        dim = inputs[name].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value and re.fullmatch(r"s\d+", dim.value):
            symbols[dim.value] = new
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    for value in [*model.graph.inputs, *model.graph.outputs, *(v for n in model.graph.all_nodes() for v in n.outputs)]:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(pattern.sub(lambda m: symbols[m.group(1)], d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape]
        value.shape = ir.Shape(dims)


def _check_io(model: ir.Model, inputs: list[str], outputs: list[str]) -> None:
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != list(inputs) or got_out != list(outputs):
        raise RuntimeError(f"exported graph has inputs {got_in} / outputs {got_out}, expected {inputs} / {outputs}")


# ---------------------------------------------------------------------------- external data
class SharedExternalData:
    """One external-data file that several models' initializers point into, each distinct
    tensor stored once, written as it is added.

    `add(model)` writes every large initializer of the model that the file does not hold yet
    (a `SourceTensor` is read, written and released; the same source tensor seen again is not
    read again; equal bytes are found by content hash) and points the initializer at its bytes.
    `flush()` pushes the written bytes to the file, `finish()` closes it.
    """

    def __init__(self, folder: Path, relative_path: str, threshold: int = EXTERNAL_THRESHOLD_BYTES):
        self.folder, self.relative_path, self.threshold = Path(folder), relative_path, threshold
        self.data = DataFile(self.folder / relative_path)
        self.by_source: dict[tuple, tuple[int, int]] = {}  # SourceTensor.key -> (offset, length)
        self.reads = 0  # source tensors read (each at most once per file)

    def add(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < self.threshold:
                    continue
                if isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir) == self.folder and tensor.location == self.relative_path:
                    continue  # already in this file
                key = tensor.key if isinstance(tensor, SourceTensor) else None
                where = self.by_source.get(key) if key is not None else None
                if where is None:
                    where = self._write(tensor)
                    if key is not None:
                        self.by_source[key] = where
                offset, length = where
                value.const_value = ir.ExternalTensor(
                    self.relative_path, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=self.folder,
                )

    def _write(self, tensor: ir.TensorProtocol) -> tuple[int, int]:
        if isinstance(tensor, SourceTensor):
            self.reads += 1
            t = tensor.torch()
            raw = t.reshape(-1).view(torch.uint8).numpy()
        else:
            raw = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
        if raw.nbytes != tensor.nbytes:
            raise RuntimeError(f"{tensor.name}: {raw.nbytes} bytes, expected {tensor.nbytes}")
        return self.data.write(tensor.dtype, raw)

    def flush(self) -> None:
        self.data.flush()

    def finish(self) -> None:
        self.data.close()
