"""What a batch job runs on: the (image, prompt) pairs of a folder, a glob, a JSONL or a Parquet file.

    >>> items = discover("photos/", prompt="caption en")            # doctest: +SKIP
    >>> items[0]                                                     # doctest: +SKIP
    Item(index=0, id='a.jpg', prompt='caption en', path='/home/me/photos/a.jpg', data=None)

* a folder: every image file under it (recursively, sorted), `id` relative to the folder;
* a glob (`"shots/**/*.png"`): the matching files, sorted, `id` as matched;
* JSONL: one object a line with the image path (relative to the file's folder) under
  `image_column`, the prompt under `prompt_column` (else `prompt` for every line) and an optional
  `id`;
* Parquet: the same columns; the image column holds paths, encoded image bytes, or
  `{"bytes", "path"}` structs (the Hugging Face `datasets` image feature).

Every problem with the input is found here, before any image is processed: a missing file or
column, a malformed line, no images, the same (id, prompt) twice. Images themselves are only
opened later: an unreadable image becomes an error row, not a failed job.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pgexport.errors import PgExportError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    """One (image, prompt) pair; `index` is its place in the input (the output keeps that order)."""

    index: int
    id: str
    prompt: str
    path: str | None = None  # the image file, absolute (Ray workers may run elsewhere); None: `data` holds it
    data: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What identifies a row across runs (`--resume`)."""
        return (self.id, self.prompt)


def discover(source: str | os.PathLike, prompt: str | None = "caption en", prompt_column: str | None = None,
             image_column: str = "image") -> list[Item]:
    """The items of a folder, glob, .jsonl or .parquet file; see the module docstring.

    `prompt_column` (JSONL / Parquet only) gives each row its own prompt; otherwise every image
    gets `prompt`.
    """
    text = str(source)
    path = Path(text)
    if path.is_dir():
        if prompt_column:
            raise PgExportError(f"--prompt-column {prompt_column} needs a .jsonl or .parquet input, but {text} is a "
                                "folder; use --prompt, or list the images and prompts in a JSONL file")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise PgExportError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {text}; check --input")
        items = [Item(i, f.relative_to(path).as_posix(), prompt, str(f.absolute())) for i, f in enumerate(files)]
    elif path.suffix.lower() == ".jsonl" and not glob.has_magic(text):
        items = _from_records(_jsonl_records(path), path, prompt, prompt_column, image_column)
    elif path.suffix.lower() == ".parquet" and not glob.has_magic(text):
        items = _from_records(_parquet_records(path, image_column, prompt_column), path, prompt, prompt_column,
                              image_column)
    elif glob.has_magic(text):
        if prompt_column:
            raise PgExportError(f"--prompt-column {prompt_column} needs a .jsonl or .parquet input, not a glob; "
                                "use --prompt")
        files = sorted(f for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise PgExportError(f"no file matches {text}; check the pattern (quote it so the shell does not expand it)")
        items = [Item(i, Path(f).as_posix(), prompt, str(Path(f).absolute())) for i, f in enumerate(files)]
    elif path.is_file():
        raise PgExportError(f"--input {text}: use a folder of images, a glob, a .jsonl or a .parquet file")
    else:
        raise PgExportError(f"--input {text} not found; pass a folder of images, a glob, a .jsonl or a .parquet file")
    _check_unique(items, text)
    return items


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """(where, object) for each non-blank line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PgExportError(f"cannot read {path}: {one_line(e)}; check --input") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise PgExportError(f"{path}:{n}: not JSON ({one_line(e)}); one object per line") from None
        if not isinstance(obj, dict):
            raise PgExportError(f"{path}:{n}: not a JSON object; one object per line")
        records.append((f"{path}:{n}", obj))
    return records


def _parquet_records(path: Path, image_column: str, prompt_column: str | None) -> list[tuple[str, dict]]:
    # pyarrow comes with the `ray` extra; a JSONL or folder input does not need it.
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise PgExportError(f"cannot read {path} as Parquet: {one_line(e)}; check --input") from None
    wanted = [c for c in (image_column, prompt_column, "id") if c and c in table.column_names]
    return [(f"{path} row {n}", row) for n, row in enumerate(table.select(wanted).to_pylist())]


def _from_records(records: list[tuple[str, dict]], path: Path, prompt: str | None, prompt_column: str | None,
                  image_column: str) -> list[Item]:
    if not records:
        raise PgExportError(f"{path} has no rows; check --input")
    items = []
    for index, (where, row) in enumerate(records):
        image = row.get(image_column)
        if isinstance(image, dict):  # Hugging Face datasets: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, (str, bytes)) or not image:
            raise PgExportError(f"{where}: no {image_column!r} (an image path or its bytes); "
                                "name the column with --image-column")
        if prompt_column:
            text = row.get(prompt_column)
            if not isinstance(text, str):
                raise PgExportError(f"{where}: no string {prompt_column!r} for --prompt-column; check the column name")
        else:
            text = prompt
        if isinstance(image, bytes):
            ident = str(row.get("id", index))
            items.append(Item(index, ident, text, None, image))
        else:
            file = Path(image) if Path(image).is_absolute() else path.parent / image
            items.append(Item(index, str(row.get("id", image)), text, str(file.absolute())))
    return items


def _check_unique(items: list[Item], source: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for item in items:
        if item.key in seen:
            raise PgExportError(f"{source}: image {item.id!r} with prompt {item.prompt!r} appears twice (rows "
                                f"{seen[item.key]} and {item.index}); each (image, prompt) pair gives one output row")
        seen[item.key] = item.index
