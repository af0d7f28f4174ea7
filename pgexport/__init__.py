"""pgexport: PaliGemma from PyTorch to production runtimes.

The base package (ONNX Runtime path) imports no PyTorch; the eager-model functions below import
it on first use and need `pip install 'pgexport[export]'`.
"""

import importlib

from pgexport.errors import PgExportError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "api", "load_processor": "api", "generate": "api", "generate_stream": "api", "init_checkpoint": "api",
    "sample_image": "api", "export": "api", "quantize": "api", "OnnxPaliGemma": "runtime", "Sampling": "runtime",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pgexport' has no attribute {name!r}")


__all__ = ["PgExportError", *_LAZY]
