"""One batch of items -> output rows, on an export loaded once. Both engines run this class (the
local engine in its threads, the Ray engine inside each actor), so they give the same texts.

    >>> predictor = Predictor("exports/demo", max_new_tokens=32)  # doctest: +SKIP
    >>> rows = predictor(items)                                   # doctest: +SKIP

The items run through a continuous-batching `Engine` (pgexport.engine): a finished answer frees
its row for the next image at once, instead of the batch waiting for its longest answer. Each
row's text is what `OnnxPaliGemma.generate` gives that image and prompt alone. A bad image or a
prompt that does not fit the context becomes an error row and the rest still runs.
"""

from __future__ import annotations

import collections
import io
import time
from typing import Iterator

from pgexport.batch.inputs import Item
from pgexport.batch.schema import result_row
from pgexport.engine import Engine
from pgexport.errors import PgExportError
from pgexport.processing.image import load_image
from pgexport.runtime.session import OnnxPaliGemma


class _NamedBytes(io.BytesIO):
    """Image bytes that `load_image`'s error messages call by the row's id."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return self._name


def open_image(item: Item):
    """The decoded PIL image of `item` (raises `PgExportError` for unreadable, truncated or bomb images)."""
    return load_image(_NamedBytes(item.data, item.id) if item.data is not None else item.path)


class Predictor:
    """An `OnnxPaliGemma` on `export_dir` and a continuous-batching `Engine` of `batch_size` rows
    over it, plus the generation settings of a job. An image takes a row as soon as one frees."""

    def __init__(self, export_dir: str, max_new_tokens: int = 32, provider: str = "cpu", threads: int | None = None,
                 batch_size: int = 8):
        self.model = OnnxPaliGemma(export_dir, provider=provider, threads=threads)
        self.max_new_tokens = max_new_tokens
        self.engine = Engine(self.model, max_batch=batch_size, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        self.engine.close()

    def __call__(self, items: list[Item]) -> list[dict]:
        """Rows of all `items` (in the order they finish)."""
        return [row for rows in self.run(items) for row in rows]

    def run(self, items: list[Item], window: int | None = None) -> Iterator[list[dict]]:
        """Rows as the requests finish, oldest first, with at most `window` requests submitted and
        not yet read (default: 4 x the engine's rows), so the engine always has the next image
        waiting while the decoded images held in memory stay bounded."""
        window = window or 4 * self.engine.max_batch
        flight: collections.deque = collections.deque()  # (item, image size, request or finished row)
        for item in items:
            flight.append(self._submit(item))
            while len(flight) >= window:
                yield [self._row(*flight.popleft())]
        while flight:
            yield [self._row(*flight.popleft())]

    def _submit(self, item: Item) -> tuple:
        start = time.perf_counter()
        try:
            image = open_image(item)
        except PgExportError as e:
            return item, None, result_row(item, None, None, str(e), time.perf_counter() - start)
        try:
            return item, image.size, self.engine.submit(image, item.prompt, self.max_new_tokens)
        except PgExportError as e:  # a prompt longer than the engine's rows: alone, if it fits the context
            try:
                text = self.model.generate([image], [item.prompt], max_new_tokens=self.max_new_tokens)[0]
                return item, image.size, result_row(item, text, image.size, None, time.perf_counter() - start)
            except PgExportError:
                return item, image.size, result_row(item, None, image.size, str(e), time.perf_counter() - start)

    def _row(self, item: Item, size, pending) -> dict:
        if isinstance(pending, dict):
            return pending
        result = pending.result()
        timing = pending.timing
        seconds = (timing.finished or 0.0) - (timing.admitted or timing.submitted)  # its own generation time
        if result.finish_reason == "error":
            return result_row(item, None, size, result.error, seconds)
        return result_row(item, result.text, size, None, seconds)
