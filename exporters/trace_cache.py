"""A disk cache of traced graphs: the second export of an architecture skips `torch.onnx.export`.

Tracing a wrapper of `graphs.py` with `torch.onnx.export(dynamo=True)` is most of an export's
time, and its result depends only on the architecture, never on the weights (the model traced
is weightless, `onnx_export.fake_model`). So the traced graph is kept, weights left out, under a
key made of everything that shapes it: the wrapper class, the config (the whole config, or the
part a wrapper declares it reads: the vision encoder's), the dtype, the opset,
the versions of torch / onnxscript / onnx-ir / onnx and the source of `pgexport.models` and
`pgexport.exporters`. Exporting a fine-tuned checkpoint of a known geometry, or the same model
again at another `--quant`, then reuses the trace; binding the weights, optimizing and writing
run as usual, and the files written are byte for byte those of an uncached export.

    >>> ir_model = traced(PrefillGraph(fake), opset=20, dtype=torch.float32, trace=trace_fn)  # doctest: +SKIP

Entries live in `$PGEXPORT_CACHE/traces/` (default `~/.cache/pgexport/traces/`), one `.onnx` file
each (the graph without weights: kilobytes for the tiny presets, a few MB at 3B), written
atomically; processes exporting one geometry at the same time trace it once (a lock file beside
the entry); an unreadable entry is traced again and replaced. `PGEXPORT_TRACE_CACHE=0` turns
the cache off. Deleting the folder is always safe.

In a cached file, each weight (a fake tensor after tracing) is an external-data reference to
`PLACEHOLDER`, a file that never exists: the file records the weight's name, dtype and shape
and nothing else. On the way out of `traced` those references become `const_value = None`,
and `onnx_export` binds every weight to its source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

try:
    import fcntl  # POSIX; without it, concurrent exports of one geometry may both trace
except ImportError:
    fcntl = None

import onnx
import onnx_ir as ir
import onnxscript
import torch
from torch._subclasses.fake_tensor import FakeTensor

import pgexport.models
from pgexport.files import cache_dir, write_bytes_atomic

PLACEHOLDER = "pgexport-unbound-weight"  # external-data location of a weight left out of the cache
ENV_SWITCH = "PGEXPORT_TRACE_CACHE"  # "0" turns the cache off


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def traced(graph: torch.nn.Module, opset: int, dtype: torch.dtype, trace: Callable[[], ir.Model]) -> ir.Model:
    """The traced graph of wrapper `graph` (its `model` is the fake model): read from the cache,
    or `trace()`d and stored. Weights are initializers with `const_value` None in both cases
    (the result always comes through the cache's serialization, so a hit and a miss are equal)."""
    if not enabled():
        return _unbound(_stored(trace()))
    path = cache_dir("traces") / f"{trace_key(graph, opset, dtype)}.onnx"
    cached = _read(path)
    if cached is not None:
        return cached
    with _locked(path):  # a process tracing the same key now: wait for its entry, do not trace twice
        cached = _read(path)
        if cached is not None:
            return cached
        proto = _stored(trace())
        try:
            write_bytes_atomic(path, proto.SerializeToString())
        except OSError:  # a read-only or full cache folder costs the next export a trace, nothing more
            pass
    return _unbound(proto)


def _read(path: Path) -> ir.Model | None:
    try:
        return _unbound(onnx.load_model_from_string(path.read_bytes()))
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: traced again and replaced
        return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on a hidden `.KEY.lock` file beside entry `path` where the OS has flock
    (else nothing). Lock files stay: removing one while another process waits on it would let a
    third take a new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.stem}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        fd = None
    if fd is None or fcntl is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def trace_key(graph: torch.nn.Module, opset: int, dtype: torch.dtype) -> str:
    """Digest of everything the traced graph depends on (see the module docstring)."""
    cls = type(graph)
    what = {
        "wrapper": f"{cls.__module__}.{cls.__qualname__}",
        # the config fields the graph reads where it says so (`traced_config`), else the whole config
        "config": graph.traced_config() if hasattr(graph, "traced_config") else dataclasses.asdict(graph.model.cfg),
        "dtype": str(dtype),
        "opset": opset,
        "versions": [torch.__version__, onnxscript.__version__, ir.__version__, onnx.__version__],
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the Python source of the model and exporter packages (any edit retraces)."""
    h = hashlib.sha256()
    for folder in (Path(pgexport.models.__file__).parent, Path(__file__).parent):
        for f in sorted(folder.rglob("*.py")):
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _stored(model: ir.Model) -> onnx.ModelProto:
    """`model` as it is cached: each fake weight replaced by a placeholder reference, metadata
    dropped (the nodes' stack traces and absolute paths, the graph's torch.export signature, which
    names every parameter of the model traced, used or not)."""
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
    for value in model.graph.initializers.values():
        value.metadata_props.clear()
        tensor = value.const_value
        if _is_fake(tensor):
            value.const_value = ir.ExternalTensor(PLACEHOLDER, 0, 0, tensor.dtype, shape=tensor.shape, name=value.name)
    return ir.to_proto(model)


def _unbound(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor) and value.const_value.location == PLACEHOLDER:
            value.const_value = None
    return model


def _is_fake(tensor) -> bool:
    return isinstance(getattr(tensor, "raw", None), FakeTensor)
