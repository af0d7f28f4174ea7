"""Results written as they finish, so a killed job keeps its work and `--resume` continues it.

While a job runs, each chunk of rows goes to its own file in `.OUT.parts/` beside the output
(`part-000000.jsonl` or `.parquet`), written under a temporary name and renamed, so a part is
either whole or absent. When every item has a row, the parts (and the rows of an earlier
complete OUT, on `--resume`) are merged into OUT in input order, again through a temporary file
and a rename, and the parts folder is removed. A later part replaces an earlier row with the
same (id, prompt): that is how `--resume` retries rows that had an error.

    >>> writer = ChunkWriter("results.parquet")   # doctest: +SKIP
    >>> writer.write(rows)                        # doctest: +SKIP
    >>> writer.finish(order)                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pgexport.batch.schema import COLUMNS, arrow_schema
from pgexport.errors import PgExportError, one_line

FORMATS = (".jsonl", ".parquet")


def output_format(out: str | os.PathLike) -> str:
    """".jsonl" or ".parquet" from the file name (a one-line error for anything else)."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise PgExportError(f"--out {out}: name a .parquet or .jsonl file")
    return suffix


def parts_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.parts")


def read_rows(path: Path) -> list[dict]:
    """The rows of one results file (JSONL or Parquet)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # optional: only Parquet files need it

            return pq.read_table(path).to_pylist()
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise PgExportError(f"cannot read results file {path}: {one_line(e)}; delete it (its rows are redone) "
                            "or write to another --out") from None


def _write_atomic(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa  # optional: only Parquet files need it
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({c: row[c] for c in COLUMNS}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ChunkWriter:
    """Writes part files as rows arrive and merges them into `out` at the end."""

    def __init__(self, out: str | os.PathLike, keep_previous: bool = True):
        self.out = Path(out)
        self.keep_previous = keep_previous  # False: an existing OUT is replaced, not merged
        self.suffix = output_format(out)
        self.parts = parts_folder(out)
        existing = sorted(self.parts.glob(f"part-*{self.suffix}")) if self.parts.is_dir() else []
        self._next = int(existing[-1].name[5:11]) + 1 if existing else 0

    def previous_rows(self) -> list[dict]:
        """Rows of an earlier run: the complete OUT, then its parts in the order they were written."""
        rows = read_rows(self.out) if self.keep_previous and self.out.is_file() else []
        if self.parts.is_dir():
            for part in sorted(self.parts.glob(f"part-*{self.suffix}")):
                rows.extend(read_rows(part))
        return rows

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.parts.mkdir(exist_ok=True)
        _write_atomic(self.parts / f"part-{self._next:06d}{self.suffix}", rows)
        self._next += 1

    def finish(self, order: dict[tuple[str, str], int]) -> int:
        """Merge every row written so far into OUT, sorted by `order` ((id, prompt) -> input index;
        rows of pairs no longer in the input go last); returns the number of rows."""
        merged: dict[tuple[str, str], dict] = {}
        for row in self.previous_rows():
            merged[(row["id"], row["prompt"])] = row  # a later row for the same pair wins
        rows = sorted(merged.values(), key=lambda r: order.get((r["id"], r["prompt"]), len(order)))
        _write_atomic(self.out, rows)
        shutil.rmtree(self.parts, ignore_errors=True)
        return len(rows)

    def discard(self) -> None:
        """Forget an earlier run's results (`overwrite`): its parts go now, OUT when the new one is written."""
        shutil.rmtree(self.parts, ignore_errors=True)
        self.keep_previous, self._next = False, 0
