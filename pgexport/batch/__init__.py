"""Batch inference over image collections: `pgexport batch` and its Python API.

    >>> from pgexport.batch import run_batch
    >>> run_batch("exports/demo", "photos/", "captions.parquet", prompt="caption en")  # doctest: +SKIP

* `inputs`: the (image, prompt) items of a folder, glob, JSONL or Parquet file;
* `model`: `--model` as an export folder, or a checkpoint / preset exported once into a cache;
* `predictor`: a batch of items -> rows on an export loaded once (shared by both engines);
* `local`, `ray_engine`: the engines (threads in this process; Ray Data actors);
* `schema`, `writer`, `progress`: the output rows, chunked writing with `--resume`, the bar;
* `job`: `run_batch`, which checks everything first, then runs an engine and writes OUT.

See docs/batch.md.
"""

from pgexport.batch.inputs import Item, discover
from pgexport.batch.job import run_batch
from pgexport.batch.schema import COLUMNS

__all__ = ["run_batch", "discover", "Item", "COLUMNS"]
