"""The local engine: a continuous-batching `Engine` (pgexport.engine) in this process.

With `workers` > 1 each worker thread holds its own `Predictor` (its own sessions, `threads`
intra-op threads each), the way each Ray actor does; ONNX Runtime releases the GIL while it
runs, so the workers overlap.

    >>> run_local("exports/demo", items, on_rows=print, batch_size=8)  # doctest: +SKIP
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

from pgexport.batch.inputs import Item
from pgexport.batch.predictor import Predictor


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def run_local(export_dir: str, items: list[Item], on_rows: Callable[[list[dict]], None], batch_size: int = 8,
              workers: int = 1, threads: int | None = None, max_new_tokens: int = 32, provider: str = "cpu") -> None:
    """Run every item; `on_rows` gets each batch's rows as soon as the batch is done (in this thread)."""
    if workers == 1:
        predictor = Predictor(export_dir, max_new_tokens, provider, threads, batch_size)
        try:
            for rows in predictor.run(items):
                on_rows(rows)
        finally:
            predictor.close()
        return
    predictors = [Predictor(export_dir, max_new_tokens, provider, threads, batch_size) for _ in range(workers)]
    free = list(range(workers))
    pending: dict = {}
    todo = iter(batches(items, batch_size))
    with ThreadPoolExecutor(workers) as pool:
        while True:
            while free:
                batch = next(todo, None)
                if batch is None:
                    break
                slot = free.pop()
                pending[pool.submit(predictors[slot], batch)] = slot
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                free.append(pending.pop(future))
                on_rows(future.result())
