"""`run_batch`: the Python API behind `pgexport batch`.

    >>> from pgexport.batch import run_batch
    >>> summary = run_batch("exports/demo", "photos/", "captions.parquet", prompt="caption en",
    ...                     batch_size=16)                                          # doctest: +SKIP
    >>> summary["rows"], summary["errors"], round(summary["images_per_second"])   # doctest: +SKIP
    (300, 0, 41)

Everything the job needs is checked before any image is processed: the output path, the input
(every row), the model (exported once into a cache if it is a checkpoint or a preset). Then the
engine runs and rows are written in chunks (`pgexport.batch.writer`); at the end OUT holds one
row per (image, prompt), in input order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from pgexport.batch.inputs import discover
from pgexport.batch.local import run_local
from pgexport.batch.model import resolve_export
from pgexport.batch.progress import ProgressBar
from pgexport.batch.ray_engine import run_ray
from pgexport.batch.writer import ChunkWriter, output_format, parts_folder
from pgexport.errors import PgExportError

ENGINES = ("local", "ray")


class _Sink:
    """Rows from the engine -> part files every `chunk_rows` rows (or `flush_seconds`), and the bar."""

    def __init__(self, writer: ChunkWriter, bar: ProgressBar, chunk_rows: int, flush_seconds: float = 30.0):
        self.writer, self.bar, self.chunk_rows, self.flush_seconds = writer, bar, chunk_rows, flush_seconds
        self.buffer: list[dict] = []
        self.errors = 0
        self.seconds: list[float] = []
        self.flushed = self.started = time.monotonic()
        self.first_rows: float | None = None  # seconds from the start to the first rows (start-up cost)
        self.first_count = 0

    def __call__(self, rows: list[dict]) -> None:
        if self.first_rows is None:
            self.first_rows, self.first_count = time.monotonic() - self.started, len(rows)
        self.buffer.extend(rows)
        errors = sum(r["error"] is not None for r in rows)
        self.errors += errors
        self.seconds.extend(r["seconds"] for r in rows)
        self.bar.update(len(rows), errors)
        if len(self.buffer) >= self.chunk_rows or time.monotonic() - self.flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.writer.write(self.buffer)
        self.buffer, self.flushed = [], time.monotonic()


def check_output(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """A one-line error, before any work, for an output that cannot or must not be written."""
    fmt = output_format(out)
    out = Path(out)
    if resume and overwrite:
        raise PgExportError("--resume and --overwrite exclude each other; --resume keeps OUT's rows, --overwrite drops them")
    if out.is_dir():
        raise PgExportError(f"--out {out} is a folder; name a {fmt} file")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise PgExportError(f"--out {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PgExportError(f"--out {out}: folder {parent} is not writable; choose another --out")
    if resume or overwrite:
        return
    if out.exists():
        raise PgExportError(f"--out {out} exists; pass --resume to add the rows it lacks, or --overwrite to replace it")
    if parts_folder(out).is_dir():
        raise PgExportError(f"an unfinished run left its rows in {parts_folder(out)}; pass --resume to continue it, "
                            "or --overwrite to start again")


def run_batch(model: str | os.PathLike | None, input: str | os.PathLike, out: str | os.PathLike,
              prompt: str = "caption en", prompt_column: str | None = None, image_column: str = "image",
              engine: str = "local", batch_size: int = 8, workers: int = 1, threads: int | None = None,
              max_new_tokens: int = 32, provider: str = "cpu", resume: bool = False, overwrite: bool = False,
              address: str | None = None, chunk_rows: int = 256, cache: str | os.PathLike | None = None,
              progress: Callable[[str], None] | None = None, bar: bool = True) -> dict:
    """Generate text for every (image, prompt) of `input` and write one row each to `out`.

    Arguments:
        model: export folder, checkpoint folder or preset (None: the built-in demo model); a
            checkpoint or preset is exported once into `cache` (`pgexport.batch.model`).
        input: folder of images, glob, .jsonl or .parquet (`pgexport.batch.inputs`).
        out: .parquet or .jsonl file (columns: `pgexport.batch.schema`).
        prompt / prompt_column: one prompt for every image, or a JSONL / Parquet column of prompts.
        engine: "local" (this process) or "ray" (Ray Data actors; `address` joins a cluster).
        batch_size: images per ONNX Runtime call; workers: threads (local) or actors (ray), each
            with its own copy of the sessions and `threads` intra-op threads (default: the cores
            divided among the workers).
        resume: keep the rows already in `out` (or in an unfinished run's parts) and run the rest
            (rows with an error are run again); overwrite: replace `out`.
        chunk_rows: rows per part file (what a killed job keeps).
        progress: receives status lines; bar: a progress bar on stderr when it is a terminal.

    Returns a summary: rows, processed, skipped (already done), errors, seconds, images_per_second,
    latencies (each processed row's `seconds`), first_rows_seconds (the start-up: until the first
    `first_rows` rows came back).
    """
    if engine not in ENGINES:
        raise PgExportError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    for name, value in (("batch_size", batch_size), ("workers", workers), ("max_new_tokens", max_new_tokens),
                        ("chunk_rows", chunk_rows), ("threads", threads or 1)):
        if value < 1:
            raise PgExportError(f"{name} must be >= 1, got {value}")
    if provider not in ("cpu", "cuda"):
        raise PgExportError(f"unknown provider {provider!r}; use cpu or cuda")
    check_output(out, resume, overwrite)
    items = discover(input, prompt=prompt, prompt_column=prompt_column, image_column=image_column)
    if output_format(out) == ".parquet" or Path(str(input)).suffix.lower() == ".parquet" or engine == "ray":
        try:
            import pyarrow.parquet  # noqa: F401 - optional: Parquet files and Ray need it
        except ModuleNotFoundError:
            raise PgExportError("Parquet files and --engine ray need pyarrow; install it with: "
                                "pip install 'pgexport[ray]' (or write --out as .jsonl)") from None
    export_dir = resolve_export(model, cache, progress)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)

    writer = ChunkWriter(out)
    if overwrite:
        writer.discard()
    done = {(r["id"], r["prompt"]) for r in writer.previous_rows() if r.get("error") is None} if resume else set()
    pending = [item for item in items if item.key not in done]
    if progress:
        skipped = f", {len(items) - len(pending)} already in {out}" if resume else ""
        progress(f"{len(pending)} of {len(items)} (image, prompt) pairs to run{skipped}; engine {engine}, "
                 f"batch {batch_size}, {workers} worker(s) x {threads} thread(s)")
    sink = _Sink(writer, ProgressBar(len(pending), stream=True if bar else None), chunk_rows)
    start = time.perf_counter()
    options = dict(batch_size=batch_size, workers=workers, threads=threads, max_new_tokens=max_new_tokens,
                   provider=provider)
    try:
        if pending:
            if engine == "local":
                run_local(str(export_dir), pending, sink, **options)
            else:
                run_ray(str(Path(export_dir).resolve()), pending, sink, address=address, **options)
    finally:  # interrupted too: what finished is kept for --resume
        sink.flush()
        sink.bar.close()
    seconds = time.perf_counter() - start
    rows = writer.finish({item.key: item.index for item in items})
    return {"out": str(out), "export": str(export_dir), "rows": rows, "processed": len(pending),
            "skipped": len(items) - len(pending), "errors": sink.errors, "seconds": seconds,
            "images_per_second": len(pending) / seconds if seconds > 0 else 0.0, "latencies": sink.seconds,
            "first_rows_seconds": sink.first_rows, "first_rows": sink.first_count}
