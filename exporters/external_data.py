"""External-data files of the exported graphs: each distinct tensor written once, read back lazily.

`DataFile` is the one writer the exporter and the quantizer share: a tensor whose bytes are
already in the file (same dtype, length and SHA-256) is not written again, which is how
prefill.onnx and decode.onnx share `decoder.onnx.data`, and how the quantized embedding table
serves both the lookup and the LM head. `ExternalDataReader` memory-maps the files of an
existing export for the quantizer.

    >>> data = DataFile(folder / "decoder.onnx.data", align=64)        # doctest: +SKIP
    >>> offset, length = data.write(onnx.TensorProto.FLOAT, array)   # doctest: +SKIP
    >>> data.close()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# Initializers at least this large go to external data; smaller ones (shape constants, scalars)
# stay inline in the graph, where they cost less than a file reference.
EXTERNAL_THRESHOLD_BYTES = 64


class DataFile:
    """One external-data file, written front to back; each distinct tensor stored once.

    `align`: every tensor starts at a multiple of this offset (1: packed).
    """

    def __init__(self, path: Path, align: int = 1):
        self.path, self.location, self.align = Path(path), Path(path).name, align
        self.file = open(path, "wb")
        self.size = 0
        self.by_content: dict[tuple, tuple[int, int]] = {}  # (dtype, bytes, sha256) -> (offset, length)

    def write(self, dtype, raw: np.ndarray) -> tuple[int, int]:
        """(offset, length) of `raw`'s bytes in the file, written now unless already there.
        `dtype` is any hashable tag of the element type (equal bytes of another type are kept apart)."""
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        key = (dtype, raw.nbytes, hashlib.sha256(memoryview(raw)).hexdigest())
        where = self.by_content.get(key)
        if where is None:
            if self.size % self.align:
                pad = self.align - self.size % self.align
                self.file.write(b"\0" * pad)
                self.size += pad
            self.file.write(memoryview(raw))
            where = self.by_content[key] = (self.size, raw.nbytes)
            self.size += raw.nbytes
        return where

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class ExternalDataReader:
    """Float initializers of the original (fp32) graphs, read from their data files on demand.

    The files are memory-mapped; `release` drops a tensor's pages from this process once it has
    been quantized or copied (they stay in the page cache and fault back in if read again).
    Without it every page read stays mapped until the end, and the process's RSS grows by the
    whole fp32 data file on top of what the quantizer allocates."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.maps: dict[str, mmap.mmap] = {}

    def key(self, tensor) -> tuple:

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

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        _, location, offset, length = self.key(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = length // np.dtype(dtype).itemsize
        return np.frombuffer(self._map(location), dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))

    def raw(self, tensor) -> np.ndarray:
        """The initializer's bytes as stored (external or inline), uint8."""

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
