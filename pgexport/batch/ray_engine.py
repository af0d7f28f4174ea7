"""The Ray engine: Ray Data's `map_batches` over an actor pool, each actor holding the export once.

    >>> run_ray("exports/demo", items, on_rows=print, workers=2)  # doctest: +SKIP

The items (ids, prompts, image paths; image bytes for a Parquet input that holds them) become a
Ray dataset; `workers` actors each load the export once and run the same `Predictor` as the local
engine (each with its own continuous-batching engine), so the rows are the same; on CUDA each actor takes a GPU. The result rows stream back to
the driver, which writes them in chunks like the local engine (they are small: text and boxes),
so `--resume` and the output file work the same way. `address` joins a running cluster
(`ray start --head` on one machine, `ray start --address ...` on the others); there the export
folder and the image paths must be readable at the same paths on every node (shared storage),
and pgexport must be installed on each.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from typing import Callable

import numpy as np

from pgexport.batch.inputs import Item
from pgexport.batch.predictor import Predictor
from pgexport.errors import PgExportError


class RayPredictor:
    """The actor class: a `Predictor` built once per actor, called on each batch of the dataset."""

    def __init__(self, export_dir: str, max_new_tokens: int, provider: str, threads: int | None, batch_size: int):
        self.predictor = Predictor(export_dir, max_new_tokens, provider, threads, batch_size)  # one engine per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item(**json.loads(meta), data=data if data else None) for meta, data in zip(batch["item"], batch["data"])]
        # Rows go back as JSON text: one string column, whatever a row's boxes hold.
        return {"row": np.array([json.dumps(row) for row in self.predictor(items)], dtype=object)}


def start_ray(address: str | None):
    """Connect to `address` (or start a local Ray), unless this process already did. Returns
    (ray module, whether this call started it)."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra must be there too
    except ModuleNotFoundError:
        raise PgExportError("--engine ray needs Ray Data; install it with: pip install 'pgexport[ray]'") from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PgExportError(f"cannot connect to the Ray cluster at {address}: {' '.join(str(e).split())[:200]}; "
                            "check --address (ray status on the head node shows it)") from None
    return ray, True


def run_ray(export_dir: str, items: list[Item], on_rows: Callable[[list[dict]], None], batch_size: int = 8,
            workers: int = 1, threads: int | None = None, max_new_tokens: int = 32, provider: str = "cpu",
            address: str | None = None) -> None:
    """Run every item on Ray; `on_rows` gets rows on the driver as batches finish."""
    ray, started = start_ray(address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images; Ray's would draw over it
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines would break our bar
        records = [{"item": json.dumps({k: v for k, v in asdict(item).items() if k != "data"}),
                    "data": item.data or b""} for item in items]
        # at least one block per actor (else the others idle), at most one per batch
        blocks = min(len(items), max(workers, min(math.ceil(len(items) / batch_size), 1000)))
        dataset = ray.data.from_items(records, override_num_blocks=blocks).map_batches(
            RayPredictor, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads or 1, num_gpus=1 if provider == "cuda" else 0,
            fn_constructor_kwargs={"export_dir": str(export_dir), "max_new_tokens": max_new_tokens,
                                   "provider": provider, "threads": threads, "batch_size": batch_size})
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            on_rows([json.loads(text) for text in batch["row"]])
    finally:
        if started:
            ray.shutdown()
