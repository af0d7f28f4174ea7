"""The benchmark scripts' measuring code: `pgexport.measure` (shared with `pgexport bench`), plus
a torch profiler helper.

    >>> from benchmarks.common import interleaved, progress
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from pgexport.measure import *  # noqa: F401,F403  (one copy of the measuring code)
from pgexport.measure import machine_info, progress, write_results


def write_report(out: str | Path, result: dict[str, Any], render: Callable[[dict, str], str], script: str,
                 argv: Iterable[str] | None, packages: Iterable[str] = ("onnxruntime", "numpy")) -> int:
    """A script's last step: add the machine to `result`, write `out`.json and `out`.md
    (`render(result, command line)`), say where. Returns 0 (the exit status).

        >>> write_report(args.out, result, markdown, "bench_pair.py", argv)  # doctest: +SKIP
    """
    result["machine"] = machine_info(list(packages))
    command = " ".join([f"python benchmarks/{script}"] + list(argv if argv is not None else sys.argv[1:]))
    paths = write_results(out, result, render(result, command))
    progress("wrote " + ", ".join(map(str, paths)))
    return 0


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
