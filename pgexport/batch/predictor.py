"""One batch of items -> output rows, on an export loaded once. Both engines run this class (the
local engine in its threads, the Ray engine inside each actor), so they give the same texts.

    >>> predictor = Predictor("exports/demo", max_new_tokens=32)  # doctest: +SKIP
    >>> rows = predictor(items)                                   # doctest: +SKIP

A bad image becomes an error row and the rest of the batch still runs. A batch that fails as a
whole (say, one prompt too long for the context) is retried one item at a time, so the error
lands on the row that caused it.
"""

from __future__ import annotations

import io
import time

from pgexport.batch.inputs import Item
from pgexport.batch.schema import result_row
from pgexport.errors import PgExportError, one_line
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
    """An `OnnxPaliGemma` on `export_dir` plus the generation settings of a job."""

    def __init__(self, export_dir: str, max_new_tokens: int = 32, provider: str = "cpu", threads: int | None = None):
        self.model = OnnxPaliGemma(export_dir, provider=provider, threads=threads)
        self.max_new_tokens = max_new_tokens

    def __call__(self, items: list[Item]) -> list[dict]:
        start = time.perf_counter()
        images, errors = {}, {}
        for item in items:
            try:
                images[item.index] = open_image(item)
            except PgExportError as e:
                errors[item.index] = str(e)
        good = [item for item in items if item.index in images]
        texts = self._generate(good, images, errors)
        seconds = time.perf_counter() - start
        rows = []
        for item in items:
            image = images.get(item.index)
            rows.append(result_row(item, texts.get(item.index), image.size if image else None,
                                   errors.get(item.index), seconds))
        return rows

    def _generate(self, items: list[Item], images: dict, errors: dict) -> dict[int, str]:
        if not items:
            return {}
        try:
            texts = self.model.generate([images[i.index] for i in items], [i.prompt for i in items],
                                        max_new_tokens=self.max_new_tokens)
            return {item.index: text for item, text in zip(items, texts)}
        except Exception as e:  # noqa: BLE001 - a job goes on; the error is reported on the row
            if len(items) > 1:
                out = {}
                for item in items:
                    out.update(self._generate([item], images, errors))
                return out
            errors[items[0].index] = str(e) if isinstance(e, PgExportError) else f"{type(e).__name__}: {one_line(e)}"
            return {}
