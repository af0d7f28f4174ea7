"""`--model` for a batch job: an export folder as it is; a checkpoint folder or a preset is exported
once (fp32) into a cache folder and that export is used, on this run and the next ones.

    >>> resolve_export("exports/pg-224")        # doctest: +SKIP
    PosixPath('exports/pg-224')
    >>> resolve_export("my-finetuned")          # doctest: +SKIP   (exports it the first time)
    PosixPath('/home/me/.cache/pgexport/exports/my-finetuned-1c0ffee2a1b2c3d4')

The cache is `$PGEXPORT_CACHE/exports` (default `~/.cache/pgexport/exports`); an entry is keyed by
the checkpoint's path and its config and weight files' names, sizes and modification times, so
a retrained checkpoint is exported again. Exporting needs PyTorch (the `export` extra); running
an export folder does not. A quantized export is made with `pgexport onnx --quant ...` and passed
as `--model`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from pgexport.bundled import default_model
from pgexport.errors import PgExportError
from pgexport.files import cache_dir
from pgexport.runtime.manifest import MANIFEST_FILE, read_manifest


def default_cache() -> Path:
    return cache_dir("exports")


def is_export(spec: str | os.PathLike) -> bool:
    return (Path(spec) / MANIFEST_FILE).is_file()


def cache_entry(spec: str, cache: Path) -> Path:
    """Where the export of checkpoint folder or preset `spec` is kept."""
    path = Path(spec)
    if not path.is_dir():  # a preset: its weights are a function of its name
        return cache / f"preset-{spec}"
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache / f"{path.resolve().name}-{h.hexdigest()[:16]}"


def resolve_export(spec: str | os.PathLike | None, cache: str | os.PathLike | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """The export folder to run for `spec` (export folder, checkpoint folder, preset, or None for the
    built-in demo model); see the module docstring."""
    spec = str(spec or default_model())
    if is_export(spec):
        read_manifest(spec)  # a broken manifest fails here, before any work
        return Path(spec)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        raise PgExportError(f"--model {spec}: the folder holds neither {MANIFEST_FILE} (an export) nor config.json "
                            "(a checkpoint); pass an export folder, a checkpoint folder or a preset name")
    if path.exists() and not path.is_dir():
        raise PgExportError(f"--model {spec} is a file; pass an export folder, a checkpoint folder or a preset name")
    entry = cache_entry(spec, Path(cache) if cache else default_cache())
    if is_export(entry):
        return entry
    # Exporting needs PyTorch; running an export does not, so the import waits until here.
    from pgexport.api import export
    from pgexport.eager.loading import check_spec

    check_spec(spec)  # a mistyped preset fails here, before "exporting it once" is printed
    if progress:
        progress(f"{spec} is not an export folder: exporting it once to {entry} (reused next time)")
    entry.parent.mkdir(parents=True, exist_ok=True)
    export(spec, entry, quant="fp32", progress=progress)
    return entry
