"""Export a `PaliGemma` to three ONNX graphs that share one decoder weight file.

    >>> from pgexport.exporters.onnx_export import export_onnx
    >>> info = export_onnx(model, "exports/paligemma-tiny")  # doctest: +SKIP
    >>> sorted(info["files"])  # doctest: +SKIP
    ['config.json', 'decode.onnx', 'decoder.onnx.data', 'prefill.onnx', 'vision_encoder.onnx', 'vision_encoder.onnx.data']

Layout of the output folder:

    config.json               the model's Hugging Face config (geometry, special ids)
    vision_encoder.onnx       + vision_encoder.onnx.data
    prefill.onnx, decode.onnx + decoder.onnx.data, ONE file both graphs point into

Pipeline: `torch.onnx.export(dynamo=True)` traces each wrapper of `graphs.py`; the onnxscript
optimizer folds constants (in particular `Transpose(W)` of every linear weight, so the files hold
weights in the `[in, out]` layout MatMul reads and the runtime has nothing to fold); then every
initializer is hashed by content and each distinct tensor is written once with
`onnx_ir.external_data.convert_tensors_to_external`. Initializers of both decoder graphs (and
identical tensors inside one graph) become external references to the same bytes. The tied
embedding stays one tensor: the embedding lookup Gathers from it and the LM head reads it through
`Gemm(transB=1)`, so no transposed copy is ever materialised.

Everything is written to a temporary folder next to `out_dir`, checked with
`onnx.checker.check_model(path)`, checked for external-data locations that stay inside the
folder, and renamed into place at the end, so a failed export leaves no half-written folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir import external_data as ir_external_data

from pgexport.models.paligemma import PaliGemma

from .graphs import DecodeGraph, PrefillGraph, VisionEncoderGraph

DEFAULT_OPSET = 20  # Gelu(approximate="tanh") is a single op from opset 20
VISION_FILE = "vision_encoder.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
VISION_DATA = "vision_encoder.onnx.data"
DECODER_DATA = "decoder.onnx.data"  # shared by prefill.onnx and decode.onnx
# Initializers at least this large go to external data (deduplicated); smaller ones (shape
# constants, scalars) stay inline in the graph, where they cost less than a file reference.
EXTERNAL_THRESHOLD_BYTES = 64


def export_onnx(
    model: PaliGemma,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> dict:
    """Export `model` to `out_dir`; returns what was written (paths, sizes, tensor counts).

    The returned dict has `out_dir`, `files` {name: bytes}, `total_bytes`, `param_bytes` (the
    model's parameters at their dtype), `fp32_param_bytes`, `size_ratio` (total / fp32 params),
    `tensors` (unique stored tensors per data file) and `opset`.
    """
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    graphs = VisionEncoderGraph(model), PrefillGraph(model), DecodeGraph(model)  # all share `model`

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        # Vision encoder: its own data file.
        say("exporting vision_encoder.onnx")
        vision = _export_graph(graphs[0], opset)
        vision_store = _SharedExternalData(tmp, VISION_DATA)
        vision_store.add(vision)
        vision_store.finish()
        del vision_store
        ir.save(vision, tmp / VISION_FILE)
        del vision

        # Prefill then decode: one data file, each distinct tensor stored once. Prefill's
        # tensors are written (and released from memory) before decode is traced.
        store = _SharedExternalData(tmp, DECODER_DATA)
        say("exporting prefill.onnx")
        prefill = _export_graph(graphs[1], opset)
        store.add(prefill)
        store.flush()
        say("exporting decode.onnx")
        decode = _export_graph(graphs[2], opset)
        store.add(decode)
        store.finish()
        ir.save(prefill, tmp / PREFILL_FILE)
        ir.save(decode, tmp / DECODE_FILE)
        del prefill, decode

        model.cfg.to_json_file(tmp / "config.json")

        say("checking the ONNX files")
        for name in (VISION_FILE, PREFILL_FILE, DECODE_FILE):
            onnx.checker.check_model(str(tmp / name))  # path form: works past 2 GB
            check_external_data(tmp / name)
        tensors = {VISION_DATA: len(_external_refs(tmp / VISION_FILE))}
        tensors[DECODER_DATA] = len(_external_refs(tmp / PREFILL_FILE) | _external_refs(tmp / DECODE_FILE))

        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    total = sum(files.values())
    numel = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    info = {
        "out_dir": str(out_dir),
        "files": files,
        "total_bytes": total,
        "param_bytes": param_bytes,
        "fp32_param_bytes": numel * 4,
        "size_ratio": total / (numel * 4),
        "tensors": tensors,
        "opset": opset,
    }
    say(f"wrote {out_dir}: {total / 2**20:.1f} MiB, {info['size_ratio']:.3f}x the fp32 parameters")
    return info


# ---------------------------------------------------------------------------- tracing
def _export_graph(graph: torch.nn.Module, opset: int) -> ir.Model:
    """Trace one wrapper with the dynamo exporter and optimize it; returns the ONNX IR model."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    graph = graph.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            graph,
            graph.example_inputs(),
            dynamo=True,
            dynamic_shapes=graph.dynamic_shapes(),
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    ir_model = program.model
    _check_io(ir_model, graph.input_names, graph.output_names)
    derived = _derived_weight_names(ir_model)
    # Constant folding + dead-code elimination. Transpose of a weight used only once is folded
    # whatever its size, so linear weights are stored pre-transposed; the tied embedding has two
    # consumers (Gather, Gemm transB) and no Transpose, so it is stored once as it is.
    onnxscript.optimizer.optimize(ir_model)
    _rename_folded_weights(ir_model, derived)
    # The exporter annotates every node with its Python stack trace and FX node (absolute source
    # paths included): most of the graph's bytes, and nothing a runtime reads.
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()
    ir_model.producer_name = "pgexport"
    return ir_model


def _derived_weight_names(model: ir.Model) -> dict[str, str]:
    """Names for values computed from one parameter and constants only, e.g. the transposed
    `q_proj.weight` -> `...q_proj.weight.transpose`, Gemma's `1 + w` -> `...weight.add`, so the
    initializers the optimizer folds them into keep a readable, parameter-based name."""
    base: dict[str, str] = {v.name: v.name for v in model.graph.initializers.values() if v.name.startswith("model.")}
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


def _check_io(model: ir.Model, inputs: list[str], outputs: list[str]) -> None:
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != list(inputs) or got_out != list(outputs):
        raise RuntimeError(f"exported graph has inputs {got_in} / outputs {got_out}, expected {inputs} / {outputs}")


# ---------------------------------------------------------------------------- external data
def _content_key(tensor: ir.TensorProtocol) -> tuple:
    """Identity of a tensor's bytes: dtype, byte length and a SHA-256 of the raw data."""
    array = tensor.numpy()
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return (tensor.dtype, raw.nbytes, hashlib.sha256(memoryview(raw)).hexdigest())


class _SharedExternalData:
    """One external-data file that several models' initializers point into, each distinct
    tensor (by content) stored once.

    `add(model)` points the model's large initializers at stored or pending tensors; `flush()`
    writes the pending ones (releasing their in-memory copies); `finish()` writes whatever is
    left and re-points every registered initializer at its final offset.
    """

    def __init__(self, folder: Path, relative_path: str, threshold: int = EXTERNAL_THRESHOLD_BYTES):
        self.folder, self.relative_path, self.threshold = folder, relative_path, threshold
        self.keys: dict[tuple, int] = {}  # content key -> index in self.tensors
        self.tensors: list[ir.TensorProtocol] = []  # distinct tensors, file order
        self.written = 0  # self.tensors[:written] are ExternalTensors in the file
        self.users: list[tuple[ir.Value, int]] = []  # (initializer, index of its tensor)

    def add(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < self.threshold:
                    continue
                key = _content_key(tensor)
                index = self.keys.get(key)
                if index is None:
                    index = self.keys[key] = len(self.tensors)
                    self.tensors.append(tensor)
                self.users.append((value, index))

    def flush(self) -> None:
        """Write all tensors so far to the file (rewriting it when it already holds some)."""
        if self.written == len(self.tensors):
            return
        # Tensors already external to this same file are streamed into the new file by
        # onnx_ir (the file is replaced atomically) and keep their offsets: the packing is
        # dense and in the same order.
        # (onnx_ir logs a warning for each old ExternalTensor it invalidates: expected here, since
        # every initializer is re-pointed at the new file just below.)
        log = logging.getLogger("onnx_ir.external_data")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            self.tensors = list(
                ir_external_data.convert_tensors_to_external(self.tensors, self.folder, self.relative_path)
            )
        finally:
            log.setLevel(level)
        self.written = len(self.tensors)
        self._point_users()

    def finish(self) -> None:
        self.flush()
        self._point_users()

    def _point_users(self) -> None:
        for value, index in self.users:
            stored = self.tensors[index]
            value.const_value = ir.ExternalTensor(
                stored.location, stored.offset, stored.length, value.const_value.dtype,
                shape=value.const_value.shape, name=value.name, base_dir=self.folder,
            )


def _external_refs(path: Path) -> set[tuple[str, int, int]]:
    """(location, offset, length) of every externally stored initializer of an ONNX file."""
    proto = onnx.load(str(path), load_external_data=False)
    refs = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            refs.add((info["location"], int(info.get("offset", 0)), int(info.get("length", 0))))
    return refs


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external data escapes its folder or runs past a file's end.

    Guards against the path-traversal issues of older ONNX releases (CVE-2022-25882,
    CVE-2024-27318); a loader should call this before handing the file to a runtime.
    """
    path = Path(path)
    folder = path.parent.resolve()
    for location, offset, length in _external_refs(path):
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise ValueError(f"{path.name}: external data location {location!r} is not relative")
        target = (folder / location).resolve()
        if target.parent != folder and folder not in target.parents:
            raise ValueError(f"{path.name}: external data location {location!r} leaves {folder}")
        if not target.is_file():
            raise ValueError(f"{path.name}: external data file {location!r} is missing")
        if offset + length > target.stat().st_size:
            raise ValueError(f"{path.name}: external data {location!r} [{offset}, +{length}) runs past the end of the file")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
