"""What `pgexport serve` is started with: the model, the engine's sizes, the limits, security.

One frozen dataclass, built by the CLI and carried to every Ray Serve replica as it is.

    >>> ServeConfig(model="exports/pg-224", max_batch=8, api_key="s3cret").max_body_bytes  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    # Export folder, checkpoint folder or preset (None: the built-in demo model).
    model: str | None = None
    # The id /v1/models lists and requests name in "model" (default: the --model folder's name).
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # With a key, every /v1/* request needs "Authorization: Bearer KEY"; /health and /metrics stay public.
    api_key: str | None = None
    # Rows decoded together (the engine's KV buffer holds this many).
    max_batch: int = 8
    # Requests waiting for a row at most; beyond max_batch + max_queue in the server, 503.
    max_queue: int = 64
    # The cap on a request's max_tokens, and its default.
    max_new_tokens: int = 128
    # ONNX Runtime intra-op threads (None: ONNX Runtime's default, every core).
    threads: int | None = None
    provider: str = "cpu"
    # file:// image URLs are read only inside this folder (None: no file:// at all).
    allowed_media_path: Path | None = None
    # On SIGTERM: seconds the requests in flight may take to finish before they are cancelled.
    shutdown_timeout: float = 30.0
    # An image's encoded bytes at most (data: or file://), and its pixels at most (read from the
    # header, before decoding).
    max_image_bytes: int = 16 * MIB
    max_image_pixels: int = 40_000_000
    # Start answering /health at once and load the model in a thread (False: load in the startup
    # hook, as a Ray Serve replica does, which is not routed to before it is ready).
    load_in_background: bool = True

    @property
    def max_body_bytes(self) -> int:
        """A request body at most: one image as base64 (4/3 of its bytes) plus room for the JSON."""
        return self.max_image_bytes * 4 // 3 + MIB

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(str(self.model)).name if self.model else "pgexport-demo"
