"""Checkpoint loading memory at a real geometry: peak RSS against the weight bytes.

Writes a random-weight checkpoint of the preset (sharded safetensors, as `pgexport init` does),
then, in a fresh process, loads it with `pgexport.load_model`, runs one forward pass so every
weight page is touched, and records peak RSS. Target (issue: from-scratch model): peak RSS of
loading `paligemma-3b-pt-224` in fp32 <= 1.3x its weight bytes.

    python benchmarks/bench_load_memory.py --preset paligemma-3b-pt-224 --workdir /tmp/pg3b
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import gib, machine_info, markdown_table, progress, write_results  # noqa: E402

_CHILD = r"""
import json, sys, time, torch
from benchmarks.common import peak_rss_bytes, current_rss_bytes
import pgexport
t0 = time.perf_counter()
model = pgexport.load_model(sys.argv[1], dtype=sys.argv[2])
load_s = time.perf_counter() - t0
after_load = current_rss_bytes()
cfg = model.cfg
ids = torch.full((1, cfg.num_image_tokens + 8), 5)
ids[:, :cfg.num_image_tokens] = cfg.image_token_id
with torch.inference_mode():  # touches every weight page
    model(ids[:, :], torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(load_s=load_s, rss_after_load=after_load, peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes)))
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
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pgexport.cli", "init", "--preset", args.preset, "--out", str(ckpt), "--dtype", args.dtype]
        subprocess.run(cmd, check=True)
        # ru_maxrss of the children: the peak of the init process, in KiB on Linux
        init = {"seconds": time.perf_counter() - t0, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    progress("loading in a fresh process")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), args.dtype], check=True, capture_output=True, text=True, cwd=root)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["peak_over_weights"] = r["peak_rss"] / r["weight_bytes"]
    data = {"preset": args.preset, "dtype": args.dtype, "init": init, "load": r, "machine": machine_info()}
    md = "# Checkpoint loading memory\n\n" + markdown_table(
        ["preset", "dtype", "weights GiB", "load s", "RSS after load GiB", "peak RSS GiB (after a forward)", "peak / weights"],
        [[args.preset, args.dtype, f"{gib(r['weight_bytes']):.2f}", f"{r['load_s']:.1f}", f"{gib(r['rss_after_load']):.2f}",
          f"{gib(r['peak_rss']):.2f}", f"{r['peak_over_weights']:.2f}x"]],
    ) + "\n\nTarget: peak / weights <= 1.3x. Weights are memory-mapped from safetensors and not copied when the dtype matches.\n"
    write_results(args.out, data, md)
    print(md)


if __name__ == "__main__":
    main()
