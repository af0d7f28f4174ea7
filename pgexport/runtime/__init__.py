"""The torch-free runtime: what an ONNX Runtime app installs (numpy, onnx, onnxruntime, tokenizers).

    manifest.py     the export folder's contract (`pgexport.json`): read, validate, write
    onnx_files.py   ONNX files and their external data, checked before a runtime opens them
    generation.py   the generation loop shared by every backend (greedy / sampling, stopping)
    session.py      `OnnxPaliGemma`: an export folder in ONNX Runtime sessions

Nothing here imports torch, `pgexport.models`, the exporters or the application layer.

    >>> from pgexport.runtime import OnnxPaliGemma
    >>> model = OnnxPaliGemma("exports/pg-224")  # doctest: +SKIP
"""

import importlib

__all__ = ["OnnxPaliGemma", "Sampling"]
_HOMES = {"OnnxPaliGemma": "pgexport.runtime.session", "Sampling": "pgexport.runtime.generation"}


def __getattr__(name):
    # Lazy, so that importing one small module of the package (quality, manifest) does not start
    # ONNX Runtime.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pgexport.runtime' has no attribute {name!r}")
