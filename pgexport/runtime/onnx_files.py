"""Reading ONNX files safely: external-data checks shared by the exporter and the runtime (no torch).

An ONNX file can keep its tensors in other files ("external data"); each tensor names a
`location` relative to the model's folder. Older ONNX releases followed such locations out of
the folder (CVE-2022-25882, CVE-2024-27318), so a loader must refuse any location that is
absolute, contains `..` or resolves (through symlinks too) outside the folder, before a runtime
opens the file:

    >>> refs = check_external_data("exports/tiny/prefill.onnx")  # doctest: +SKIP
    >>> sorted({r.location for r in refs})  # doctest: +SKIP
    ['decoder.onnx.data']

`check_external_data` raises `PgExportError` (one line naming the file, the location and the
fix) for an unreadable or corrupt ONNX file, a location that leaves the folder, a missing data
file or a tensor that runs past the end of its data file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError

from pgexport.errors import PgExportError
from pgexport.runtime.manifest import GRAPH_KEYS, OPTIONAL_GRAPH_KEYS, read_manifest


@dataclass(frozen=True)
class ExternalRef:
    """One externally stored tensor: where its bytes are and what they are."""

    name: str  # initializer (or attribute tensor) name
    location: str  # as written in the file, relative to the model's folder
    offset: int
    length: int
    data_type: int  # onnx.TensorProto.DataType
    dims: tuple[int, ...]
    initializer: bool = True  # a top-level graph initializer (not an attribute or subgraph tensor)


def load_graph_proto(path: str | os.PathLike):
    """`onnx.load` without external data, turning a missing or corrupt file into one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise PgExportError(f"ONNX file {path} is missing; re-export the folder (pgexport onnx ...)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as e:
        raise PgExportError(f"{path} is not a readable ONNX file (corrupt or truncated: {e}); re-export it") from None
    if not proto.graph.node and not proto.graph.output:
        # protobuf parses many byte strings (e.g. an empty or zeroed file) as an empty message
        raise PgExportError(f"{path} holds no ONNX graph (corrupt or truncated); re-export it")
    return proto


def _all_tensors(graph, top: bool = True):
    """(tensor, is_top_level_initializer) for every TensorProto of a graph: initializers, sparse
    initializers, attribute tensors, subgraphs (recursively)."""
    for t in graph.initializer:
        yield t, top
    for sparse in graph.sparse_initializer:
        yield sparse.values, False
        yield sparse.indices, False
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for t in attr.tensors:
                yield t, False
            if attr.HasField("g"):
                yield from _all_tensors(attr.g, False)
            for sub in attr.graphs:
                yield from _all_tensors(sub, False)


def external_refs(proto) -> list[ExternalRef]:
    """The externally stored tensors of a loaded `ModelProto` (external data not loaded)."""
    refs = []
    for t, top in _all_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            refs.append(ExternalRef(t.name, info.get("location", ""), int(info.get("offset", 0) or 0),
                                    int(info.get("length", 0) or 0), t.data_type, tuple(t.dims), top))
        except ValueError:
            raise PgExportError(f"tensor {t.name!r} has a malformed external-data entry {info}; re-export the model") from None
    return refs


def check_location(model_path: Path, location: str) -> Path:
    """Resolve one external-data `location` of `model_path`; refuse it unless it stays inside the folder."""
    folder = model_path.parent.resolve()
    where = f"{model_path.name}: external data location {location!r}"
    if not location:
        raise PgExportError(f"{where} is empty; re-export the model")
    if (PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive or location.startswith(("/", "\\"))):
        raise PgExportError(f"{where} is an absolute path; refusing it (external data must stay inside "
                            f"{folder}); re-export the model")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise PgExportError(f"{where} contains '..' and would leave {folder}; refusing it; re-export the model")
    target = (folder / location).resolve()
    if folder != target and folder not in target.parents:
        raise PgExportError(f"{where} resolves to {target}, outside {folder}; refusing it; re-export the model")
    return target


def check_external_data(path: str | os.PathLike, proto=None) -> list[ExternalRef]:
    """Refuse an ONNX file whose external data leaves its folder, is missing or is too short.

    Returns the external references (location, offset, length, type, shape) of the file.
    """
    path = Path(path)
    proto = proto if proto is not None else load_graph_proto(path)
    refs = external_refs(proto)
    sizes: dict[str, int] = {}
    for ref in refs:
        if ref.location not in sizes:
            target = check_location(path, ref.location)
            if not target.is_file():
                raise PgExportError(f"{path.name}: external data file {ref.location!r} is missing from "
                                    f"{path.parent}; copy the whole export folder")
            sizes[ref.location] = target.stat().st_size
        if ref.offset < 0 or ref.length < 0 or ref.offset + ref.length > sizes[ref.location]:
            raise PgExportError(f"{path.name}: tensor {ref.name!r} at [{ref.offset}, +{ref.length}) runs past the "
                                f"end of {ref.location!r} ({sizes[ref.location]} bytes): the data file is truncated; "
                                "re-copy or re-export the folder")
    return refs


# ---------------------------------------------------------------------------- describing an export
def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in shape.dim]


def _type_name(value_info) -> str:
    elem = value_info.type.tensor_type.elem_type
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "?"


def describe_export(folder: str | os.PathLike) -> dict:
    """What `pgexport inspect` prints: manifest, and per graph its files, sizes, inputs and outputs.

    Reads only the graph structure (no weights, no ONNX Runtime session); refuses external-data
    locations that leave the folder, like the runtime.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    graphs = {}
    for key in [*GRAPH_KEYS, *(k for k in OPTIONAL_GRAPH_KEYS if k in manifest.graphs)]:
        path = folder / manifest.graphs[key]
        proto = load_graph_proto(path)
        refs = check_external_data(path, proto)
        inits = {t.name for t in proto.graph.initializer}
        data_files = sorted({r.location for r in refs})
        graphs[key] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "data_files": {name: (folder / name).stat().st_size for name in data_files},
            "external_tensors": len(refs),
            "external_bytes": sum(r.length for r in refs),
            "inputs": [(i.name, _type_name(i), _dims(i)) for i in proto.graph.input if i.name not in inits],
            "outputs": [(o.name, _type_name(o), _dims(o)) for o in proto.graph.output],
            "opsets": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
            "nodes": len(proto.graph.node),
        }
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"folder": str(folder), "manifest": manifest.to_dict(), "graphs": graphs, "files": files,
            "total_bytes": sum(files.values())}
