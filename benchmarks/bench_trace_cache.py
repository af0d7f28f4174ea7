"""What the cache of traced graphs saves: tracing against loading, per graph, and whole exports.

    python benchmarks/bench_trace_cache.py

Two parts, in one run:

* Per graph (`--geometries`, default the demo model and `paligemma-3b-pt-224` at full depth):
  each exported wrapper of `exporters/graphs.py` traced from the weightless model
  (`torch.onnx.export`, as an export does on a cache miss, entry written) and then read back
  from the cache (a hit), in this process; seconds and the entry's size. No weights are needed,
  so the 3B geometry costs no memory beyond the trace.
* Whole exports (`--export`, default the built-in demo model): `pgexport onnx --model ... --out
  ...` (validation included, as a user runs it) in a fresh process, with the cache turned off,
  with an empty cache, and with the cache the previous run filled; then `--quant int8` with that
  cache. Wall seconds and the ratio to the uncached export.

Writes benchmarks/results/trace_cache.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine_markdown, markdown_table, progress, run_child, write_report  # noqa: E402
from pgexport.exporters import trace_cache  # noqa: E402
from pgexport.exporters.graphs import DecodeGraph, DecoderGraph, PrefillGraph, VisionEncoderGraph  # noqa: E402
from pgexport.exporters.onnx_export import DEFAULT_OPSET, fake_model, trace_graph  # noqa: E402
from pgexport.models import PaliGemmaConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "trace_cache"  # .json and .md
WRAPPERS = (VisionEncoderGraph, PrefillGraph, DecodeGraph, DecoderGraph)


def geometry(name: str) -> PaliGemmaConfig:
    if name == "demo":
        from pgexport.bundled import default_model

        return PaliGemmaConfig.from_json_file(Path(default_model()) / "config.json")
    return PaliGemmaConfig.from_preset(name)


def must_not_trace():
    raise AssertionError("a cached graph was traced again")


def per_graph(name: str, cache: Path) -> list[dict]:
    os.environ["PGEXPORT_CACHE"] = str(cache)
    cfg = geometry(name)
    fake_mode, fake = fake_model(cfg, torch.float32)
    rows = []
    for wrapper in WRAPPERS:
        graph = wrapper(fake).eval()
        progress(f"{name}: tracing {wrapper.__name__}")
        t = time.perf_counter()
        trace_cache.traced(graph, DEFAULT_OPSET, torch.float32, lambda: trace_graph(graph, DEFAULT_OPSET, fake_mode))
        miss = time.perf_counter() - t
        t = time.perf_counter()
        trace_cache.traced(graph, DEFAULT_OPSET, torch.float32, must_not_trace)
        hit = time.perf_counter() - t
        entry = cache / "traces" / f"{trace_cache.trace_key(graph, DEFAULT_OPSET, torch.float32)}.onnx"
        rows.append({"geometry": name, "graph": wrapper.__name__, "layers": [cfg.vision.num_hidden_layers, cfg.text.num_hidden_layers],
                     "trace_s": miss, "cached_s": hit, "entry_bytes": entry.stat().st_size})
    return rows


def whole_exports(model: str | None, work: Path) -> list[dict]:
    cli = [sys.executable, "-m", "pgexport.cli", "onnx", *(["--model", model] if model else [])]
    runs = [("cache off", {trace_cache.ENV_SWITCH: "0"}, []), ("empty cache", {}, []), ("cache filled", {}, []),
            ("cache filled, --quant int8", {}, ["--quant", "int8"])]
    rows = []
    for i, (label, env, extra) in enumerate(runs):
        progress(f"export: {label}")
        child = run_child([*cli, "--out", str(work / f"out{i}"), *extra],
                          env={**os.environ, "PGEXPORT_CACHE": str(work / "cache"), **env}, echo=False)
        if child.code != 0:
            raise SystemExit(f"export failed ({label}): {child.failure()}")
        rows.append({"run": label, "wall_s": child.wall_s})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometries", default="demo,paligemma-3b-pt-224", help="'demo' or presets (comma-separated)")
    ap.add_argument("--export", default="demo", help="'demo' (the built-in model), a preset or a checkpoint folder; '' skips")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="trace-cache-") as work:
        work = Path(work)
        graphs = [row for name in args.geometries.split(",") if name for row in per_graph(name, work / name)]
        exports = whole_exports(None if args.export == "demo" else args.export, work) if args.export else []
    result = {"graphs": graphs, "exports": exports, "export_model": args.export, "torch": torch.__version__}
    return write_report(args.out, result, markdown, "bench_trace_cache.py", argv, packages=("torch", "onnxscript", "onnxruntime"))


def markdown(r: dict, command: str) -> str:
    lines = ["# The cache of traced graphs", "", f"`{command}`", "",
             "## Per graph: traced (a cache miss, entry written) and read from the cache (a hit)", "",
             markdown_table(["geometry", "graph", "layers (vision / text)", "trace s", "cached s", "trace / cached", "entry KiB"],
                            [[g["geometry"], g["graph"], f"{g['layers'][0]} / {g['layers'][1]}", f"{g['trace_s']:.1f}",
                              f"{g['cached_s']:.2f}", f"{g['trace_s'] / g['cached_s']:.0f}x", f"{g['entry_bytes'] / 1024:.0f}"]
                             for g in r["graphs"]])]
    for name in dict.fromkeys(g["geometry"] for g in r["graphs"]):
        rows = [g for g in r["graphs"] if g["geometry"] == name]
        lines.append(f"\n{name}, all graphs: {sum(g['trace_s'] for g in rows):.0f} s traced, "
                     f"{sum(g['cached_s'] for g in rows):.1f} s from the cache.")
    if r["exports"]:
        base = r["exports"][0]["wall_s"]
        lines += ["", f"## Whole exports: `pgexport onnx` ({r['export_model']} model, validation included), a fresh process each", "",
                  markdown_table(["run", "wall s", "/ cache off"],
                                 [[e["run"], f"{e['wall_s']:.1f}", f"{e['wall_s'] / base:.2f}"] for e in r["exports"]])]
    lines += ["", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
