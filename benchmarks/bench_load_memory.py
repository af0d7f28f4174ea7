"""Checkpoint loading memory at a real geometry: peak RSS against the weight bytes.

Writes a random-weight checkpoint of the preset (sharded safetensors, as `pgexport init` does),
then, in a fresh process, loads it with `pgexport.load_model`, runs one forward pass so every
weight page is touched, and records peak RSS. Target (issue: from-scratch model): peak RSS of
loading `paligemma-3b-pt-224` in fp32 <= 1.3x its weight bytes.

    python benchmarks/bench_load_memory.py --preset paligemma-3b-pt-224 --workdir /tmp/pg3b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    gib, init_command, machine_info, markdown_table, progress, run_child, save_results,
)

_CHILD = r"""
import sys, time, torch
from benchmarks.common import current_rss_bytes, emit, peak_rss_bytes, random_inputs
import pgexport
t0 = time.perf_counter()
model = pgexport.load_model(sys.argv[1], dtype=sys.argv[2])
load_s = time.perf_counter() - t0
after_load = current_rss_bytes()
ids, _, px = random_inputs(model.cfg, 8, seed=0)
with torch.inference_mode():  # touches every weight page
    model(torch.from_numpy(ids), torch.from_numpy(px).to(model.dtype))
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
emit(dict(load_s=load_s, rss_after_load=after_load, peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workdir", default="/tmp/pgexport-bench-load")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_memory"))
    args = ap.parse_args()

    ckpt = Path(args.workdir) / f"{args.preset}-{args.dtype}"
    init = None
    if not (ckpt / "config.json").exists():
        progress(f"writing {ckpt} (random weights)")
        c = run_child(init_command(args.preset, ckpt, args.dtype))
        if c.code != 0:
            raise SystemExit(f"pgexport init failed ({c.failure(1)})")
        init = {"seconds": c.wall_s, "peak_rss": c.peak_rss}  # the init process's own peak
    progress("loading in a fresh process")
    c = run_child([sys.executable, "-c", _CHILD, str(ckpt), args.dtype])
    if not c.ok:
        raise SystemExit(f"loading failed ({c.failure(1)})")
    r = c.result
    r["peak_over_weights"] = r["peak_rss"] / r["weight_bytes"]
    data = {"preset": args.preset, "dtype": args.dtype, "init": init, "load": r, "machine": machine_info()}
    md = "# Checkpoint loading memory\n\n" + markdown_table(
        ["preset", "dtype", "weights GiB", "load s", "RSS after load GiB", "peak RSS GiB (after a forward)", "peak / weights"],
        [[args.preset, args.dtype, f"{gib(r['weight_bytes']):.2f}", f"{r['load_s']:.1f}", f"{gib(r['rss_after_load']):.2f}",
          f"{gib(r['peak_rss']):.2f}", f"{r['peak_over_weights']:.2f}x"]],
    ) + "\n\nTarget: peak / weights <= 1.3x. Weights are memory-mapped from safetensors and not copied when the dtype matches.\n"
    save_results(args.out, data, md, echo=True)


if __name__ == "__main__":
    main()
