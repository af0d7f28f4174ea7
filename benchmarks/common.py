"""The benchmark scripts' measuring code: `pgexport.measure` (shared with `pgexport bench`), plus
a torch profiler helper.

    >>> from benchmarks.common import interleaved, progress
"""

from __future__ import annotations

from typing import Any, Callable

from pgexport.measure import *  # noqa: F401,F403  (one copy of the measuring code)


def profile_table(fn: Callable[[], Any], row_limit: int = 20, sort_by: str = "self_cpu_time_total") -> tuple[str, list[dict[str, Any]]]:
    """Run `fn` once under torch.profiler (CPU): the text table and the top ops as dicts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    avgs = prof.key_averages()
    table = avgs.table(sort_by=sort_by, row_limit=row_limit)
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    total = sum(e.self_cpu_time_total for e in avgs) or 1
    rows = [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "self_cpu_pct": 100.0 * e.self_cpu_time_total / total, "cpu_total_ms": e.cpu_time_total / 1e3}
        for e in top
    ]
    del torch
    return table, rows
