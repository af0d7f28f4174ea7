"""One output row per (image, prompt): the same columns from every engine, in JSONL or Parquet.

| column | type | |
|---|---|---|
| `id` | string | the image's id: its path relative to the input folder, as matched by the glob, or the `id` column |
| `image` | string or null | the image file's absolute path (null when the input held the bytes) |
| `prompt` | string | |
| `text` | string or null | the generated text (null on error) |
| `boxes` | list of {label, x0, y0, x1, y1} or null | `detect ...` prompts: pixel boxes in the original image; null for other prompts |
| `width`, `height` | int or null | the image's size in pixels |
| `error` | string or null | why the row has no text (unreadable image, ...); null on success |
| `seconds` | float | wall time of the batch that produced the row (read, preprocess, generate): the row's latency |

    >>> row = result_row(Item(0, "a.png", "detect circle", "a.png"), "<loc0000><loc0000><loc1023><loc1023> circle",
    ...                  (100, 50), None, 0.25)
    >>> row["boxes"]
    [{'label': 'circle', 'x0': 0.0, 'y0': 0.0, 'x1': 100.0, 'y1': 50.0}]
"""

from __future__ import annotations

from pgexport.batch.inputs import Item
from pgexport.processing.detection import parse_detections

COLUMNS = ("id", "image", "prompt", "text", "boxes", "width", "height", "error", "seconds")
TIMING_COLUMNS = ("seconds",)  # the only columns two runs over the same input may differ in


def is_detect(prompt: str) -> bool:
    return prompt.startswith("detect ")


def result_row(item: Item, text: str | None, size: tuple[int, int] | None, error: str | None,
               seconds: float) -> dict:
    """The output row of `item`: generated `text` for an image of `size` (width, height), or `error`."""
    boxes = None
    if text is not None and size is not None and is_detect(item.prompt):
        boxes = [{"label": d.label, "x0": d.box[0], "y0": d.box[1], "x1": d.box[2], "y1": d.box[3]}
                 for d in parse_detections(text, *size)]
    return {"id": item.id, "image": item.path, "prompt": item.prompt, "text": text, "boxes": boxes,
            "width": size[0] if size else None, "height": size[1] if size else None, "error": error,
            "seconds": seconds}


def arrow_schema():
    """The Parquet schema of the rows (pyarrow, from the `ray` extra)."""
    import pyarrow as pa  # optional: only a .parquet output needs it

    box = pa.struct([("label", pa.string()), ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()),
                     ("y1", pa.float64())])
    return pa.schema([("id", pa.string()), ("image", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
                      ("boxes", pa.list_(box)), ("width", pa.int64()), ("height", pa.int64()),
                      ("error", pa.string()), ("seconds", pa.float64())])
