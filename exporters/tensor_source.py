"""Where the exporter reads the weights from: a state dict in memory or a checkpoint on disk.

The ONNX graphs are traced on a weightless copy of the model (fake tensors), so tracing costs no
memory; the weights are only read when the external-data files are written, one tensor at a
time, through a `TensorSource`:

* `StateDictSource` wraps an in-memory `PaliGemma` (or any state dict with this package's
  parameter names): a tensor is a view of the parameter, cast if the export dtype differs.
* `CheckpointSource` reads a Hugging Face folder (`model.safetensors` or its shards) without
  loading it: the safetensors headers are parsed once, and `read(name)` `pread`s that one
  tensor's bytes into a fresh buffer (no memory map stays behind, so the pages read do not pile
  up in the process's resident set), then casts it. The folder is checked as strictly as
  `load_checkpoint` checks it: every tensor must map to a parameter of the same shape, every
  parameter must be present, and an explicit LM head must equal the embedding table (compared
  in row blocks, never two full tables in memory).

    >>> source = CheckpointSource("paligemma-3b-pt-224")  # doctest: +SKIP
    >>> source.read("language_model.norm.weight", torch.float32).shape  # doctest: +SKIP
    torch.Size([2048])
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from pgexport.errors import PgExportError
from pgexport.models.checkpoint import (EMBED_KEY, expected_shapes, match_weights, read_config, unreadable_safetensors,
                                        untied_head_error, weight_files)
from pgexport.models.config import PaliGemmaConfig

# safetensors dtype codes -> torch dtypes (the ones a PaliGemma checkpoint can hold).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
_HEAD_COMPARE_BYTES = 64 << 20  # row block size when checking an explicit head against the embedding


class TensorSource:
    """Named tensors with known shapes, read one at a time."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` as a contiguous CPU tensor of `dtype` (a view where no cast is needed)."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of the tensors at the dtype they are stored in."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class StateDictSource(TensorSource):
    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = dict(state)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.state[name].detach().to(device="cpu", dtype=dtype).contiguous()

    def stored_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state.values())

    def describe(self) -> str:
        return "the in-memory model"


class _Entry:
    __slots__ = ("path", "key", "dtype", "shape", "start", "end")

    def __init__(self, path: Path, key: str, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.path, self.key, self.dtype, self.shape, self.start, self.end = path, key, dtype, shape, start, end


class CheckpointSource(TensorSource):
    """Tensors of a Hugging Face PaliGemma folder, read on demand with `pread`."""

    def __init__(self, folder: str | os.PathLike, expected: Mapping[str, tuple[int, ...]] | None = None):
        self.folder = Path(folder)
        self.cfg: PaliGemmaConfig = read_config(self.folder)
        if expected is None:
            expected = expected_shapes(self.cfg)
        entries = {(path, key): entry for path in weight_files(self.folder) for key, entry in _read_header(path).items()}
        found, heads = match_weights(self.folder, {k: e.shape for k, e in entries.items()}, expected)
        self.entries: dict[str, _Entry] = {name: entries[where] for name, where in found.items()}
        for where in heads:
            if not self._same_tensor(entries[where], self.entries[EMBED_KEY]):
                raise untied_head_error(where[1])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        e = self.entries[name]
        t = _pread_tensor(e.path, e.start, e.end - e.start, e.dtype).reshape(e.shape)
        return t if t.dtype == dtype else t.to(dtype)

    def stored_bytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())

    def describe(self) -> str:
        return str(self.folder)

    def _same_tensor(self, a: _Entry, b: _Entry) -> bool:
        """Equal values (after casting both to fp32), compared block by block."""
        if a.shape != b.shape:
            return False
        rows = a.shape[0] if a.shape else 1
        row_elems = max(1, (int(torch.Size(a.shape).numel()) // rows) if rows else 1)
        block = max(1, _HEAD_COMPARE_BYTES // (row_elems * 4))
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            ta = _pread_rows(a, r0, r1, row_elems).float()
            tb = _pread_rows(b, r0, r1, row_elems).float()
            if not torch.equal(ta, tb):
                return False
        return True


def _read_header(path: Path) -> dict[str, _Entry]:
    """safetensors layout: u64 little-endian header length N, N bytes of JSON, then the data.
    Returns key -> entry with absolute byte offsets; refuses offsets outside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} is impossible for a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise unreadable_safetensors(path, e) from None
    base = 8 + n
    out: dict[str, _Entry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (base + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PgExportError(f"{path}: tensor {key} has an unreadable header entry {info!r}; the file is corrupt, re-download it") from None
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or start < base or end > size:
            raise PgExportError(f"{path}: tensor {key} {list(shape)} {info['dtype']} has data offsets outside the file or of the wrong length; the file is corrupt or truncated, re-download it")
        out[key] = _Entry(path, key, dtype, shape, start, end)
    return out


def _pread_tensor(path: Path, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """Read `nbytes` at `offset` into a new tensor (anonymous memory, freed with the tensor)."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise PgExportError(f"{path} ended early while reading {nbytes} bytes at {offset}; the file is truncated, re-download it")
            done += got
        if hasattr(os, "posix_fadvise"):  # read once: do not keep it in the page cache on our account
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out.view(dtype)


def _pread_rows(entry: _Entry, r0: int, r1: int, row_elems: int) -> torch.Tensor:
    item = torch.empty((), dtype=entry.dtype).element_size()
    start = entry.start + r0 * row_elems * item
    return _pread_tensor(entry.path, start, (r1 - r0) * row_elems * item, entry.dtype)
