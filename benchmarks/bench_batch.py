"""Throughput of `pgexport batch`: the local engine at batch 1 / 4 / 16 and the Ray engine with 1
and 2 actors, on the same images in one run.

    python benchmarks/bench_batch.py                           # the built-in demo model
    python benchmarks/bench_batch.py /tmp/b3-6l/int4 --large-images 8

`/tmp/b3-6l/int4`: the `paligemma-3b-pt-224` geometry with 6 decoder layers
(`common.reduced_config(cfg, text_layers=6)`), random weights, exported with
`export_folder(model, ..., quant="int4")` (the folders bench_runtime_memory.py and
bench_kv_cache.py measure).

For each export (the demo model, exported first into a work folder, then any folders given),
every configuration runs `pgexport.batch.run_batch` over the same generated shape images
(prompts cycling over a caption, a detection and a question, so batches mix prompt lengths),
one after another in this process, in `--rounds` interleaved rounds (medians reported):

* `local b1`, `local b4`, `local b16`: one worker with every core;
* `ray 1 actor`, `ray 2 actors`: Ray started by the job itself (`ray.init` on this machine) and
  shut down after it, as a user's `pgexport batch --engine ray` does; one actor with every core,
  or two with one core each; batch 16.

Each configuration runs twice: a job of one image per worker (its time is the job's fixed cost:
model load, and for Ray `ray.init`, the actors' start and `ray.shutdown`, plus one image) and a
job over every image. Reported: images/s over the whole job (fixed cost included), the fixed
cost, the marginal images/s ((images - those of the small job) / (seconds - its seconds)),
per-image latency percentiles (a row's latency is the wall time of the batch it was in), and
whether the rows equal `local b1`'s (timing aside). Also: importing Ray and `ray.init` alone,
timed apart.
Writes benchmarks/results/batch.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    export_folders, machine_markdown, markdown_table, progress, usable_cores, write_report,
)
from pgexport.batch import run_batch  # noqa: E402
from pgexport.batch.writer import read_rows  # noqa: E402
from pgexport.train.dataset import random_scene, render  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "batch"  # .json and .md
PROMPTS = ["caption en", "detect circle", "answer en how many shapes are there?"]


def configs(cores: int) -> dict[str, dict]:
    return {
        "local b1": dict(engine="local", batch_size=1, workers=1, threads=cores),
        "local b4": dict(engine="local", batch_size=4, workers=1, threads=cores),
        "local b16": dict(engine="local", batch_size=16, workers=1, threads=cores),
        "ray 1 actor": dict(engine="ray", batch_size=16, workers=1, threads=cores),
        "ray 2 actors": dict(engine="ray", batch_size=16, workers=2, threads=max(1, cores // 2)),
    }


def write_inputs(folder: Path, n: int) -> Path:
    """n generated shape images and a JSONL giving each a prompt."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "input.jsonl", "w") as f:
        for i in range(n):
            render(random_scene(rng)).save(folder / "images" / f"{i:04d}.png")
            f.write(json.dumps({"image": f"images/{i:04d}.png", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n")
    return folder / "input.jsonl"


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def ray_startup() -> dict[str, float]:
    """Importing Ray Data and `ray.init()` alone, in a fresh interpreter."""
    code = ("import json, time; t=time.perf_counter(); import ray, ray.data; t1=time.perf_counter(); "
            "ray.init(include_dashboard=False, log_to_driver=False); t2=time.perf_counter(); ray.shutdown(); "
            "t3=time.perf_counter(); print(json.dumps({'import_s': t1-t, 'init_s': t2-t1, 'shutdown_s': t3-t2}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def head(inputs: Path, n: int) -> Path:
    """The first n lines of a JSONL input, as a JSONL beside it (same relative image paths)."""
    path = inputs.with_name(f"head{n}.jsonl")
    path.write_text("".join(inputs.read_text().splitlines(keepends=True)[:n]))
    return path


def bench_model(name: str, export_dir: Path, inputs: Path, work: Path, new_tokens: int, cores: int,
                rounds: int) -> dict:
    """Each configuration on one image per worker (its fixed cost: start-up, load, one image) and on
    every image, in `rounds` interleaved rounds (round-major), medians over the rounds; the marginal
    rate is the difference's images over its seconds."""
    total = sum(1 for _ in inputs.open())
    samples: dict[str, list[dict]] = {label: [] for label in configs(cores)}
    reference = None
    for round_ in range(rounds):
        for label, config in configs(cores).items():
            progress(f"{name}: {label} (round {round_ + 1}/{rounds})")
            load = os.getloadavg()[0]  # the machine is shared: what else ran shows here
            out = work / f"{name}-{label.replace(' ', '_')}.jsonl"
            few = config["workers"]  # one image per worker
            small = run_batch(export_dir, head(inputs, few), out, prompt_column="prompt", max_new_tokens=new_tokens,
                              bar=False, overwrite=True, **config)
            s = run_batch(export_dir, inputs, out, prompt_column="prompt", max_new_tokens=new_tokens, bar=False,
                          overwrite=True, **config)
            rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out)]
            reference = reference if reference is not None else rows
            samples[label].append({"seconds": s["seconds"], "images": s["processed"], "fixed_images": few,
                                   "fixed_seconds": small["seconds"], "latencies": s["latencies"],
                                   "errors": s["errors"], "same_rows": rows == reference, "load": load})
            progress(f"  {s['images_per_second']:.2f} images/s; {few} images take {small['seconds']:.1f} s")
    runs = {}
    for label, config in configs(cores).items():
        got = samples[label]
        seconds = float(np.median([g["seconds"] for g in got]))
        fixed = float(np.median([g["fixed_seconds"] for g in got]))
        images, few = got[0]["images"], got[0]["fixed_images"]
        runs[label] = {
            **config, "images": images, "seconds": seconds, "images_per_second": images / seconds,
            "images_per_second_rounds": [g["images"] / g["seconds"] for g in got],
            "fixed_images": few, "fixed_seconds": fixed,
            "marginal_images_per_second": (images - few) / (seconds - fixed) if seconds > fixed else None,
            "latency": percentiles([x for g in got for x in g["latencies"]]),
            "errors": got[0]["errors"], "same_rows_as_local_b1": all(g["same_rows"] for g in got),
            "load_avg_1min_before": [g["load"] for g in got],
        }
    return {"export": str(export_dir), "rounds": rounds, "runs": runs}


def render_markdown(result: dict, command: str) -> str:
    lines = ["# `pgexport batch` throughput: local engine vs Ray Data", "",
             f"`{command}`", "",
             f"{result['images']} images for the demo model, {result['large_images']} for other exports; "
             f"{result['new_tokens']} new tokens at most; prompts cycle over {', '.join(repr(p) for p in PROMPTS)}. "
             f"{result['cores']} cores. Configurations run one after another in one process, in interleaved rounds "
             "(figures: medians over the rounds; the 1-minute load average before each run shows what else ran on "
             "the shared machine). A row's latency is "
             "the wall time of the batch it was in. Each configuration also ran a job of one image per worker: its "
             "time is the fixed cost of a job (model load; for Ray also `ray.init` and the actors' start, then "
             "`ray.shutdown`), and the marginal rate is (images - those) / (seconds - that time).", ""]
    for name, model in result["models"].items():
        b1 = model["runs"]["local b1"]["images_per_second"]
        rows = []
        for label, r in model["runs"].items():
            lat = r["latency"]
            marginal = r["marginal_images_per_second"]
            rows.append([label, f"{r['images_per_second']:.2f}", f"{r['images_per_second'] / b1:.2f}x",
                         f"{r['fixed_seconds']:.1f}", f"{marginal:.2f}" if marginal else "-",
                         f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                         "yes" if r["same_rows_as_local_b1"] else "NO",
                         " / ".join(f"{x:.1f}" for x in r["load_avg_1min_before"])])
        lines += [f"## {name} (`{model['export']}`, median of {model['rounds']} round(s))", "",
                  markdown_table(["config", "images/s", "vs local b1", "fixed cost s (one image per worker)",
                                  "marginal images/s",
                                  "latency p50 s", "p90 s", "p99 s", "rows = local b1", "load avg before"], rows), ""]
    st = result["ray_startup"]
    lines += ["## Ray's fixed cost", "",
              f"In a fresh interpreter: `import ray, ray.data` {st['import_s']:.1f} s, `ray.init()` "
              f"{st['init_s']:.1f} s, `ray.shutdown()` {st['shutdown_s']:.1f} s.", "",
              machine_markdown(result["machine"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="*", help="more export folders (e.g. a reduced-depth 3B int4 export)")
    ap.add_argument("--images", type=int, default=192, help="images for the demo model")
    ap.add_argument("--large-images", type=int, default=16, help="images for the other exports")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds for the demo model (medians)")
    ap.add_argument("--large-rounds", type=int, default=1, help="rounds for the other exports")
    ap.add_argument("--demo-export", default=None, help="an export of the demo model to reuse (default: export it)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    folders = export_folders(ap, args.exports, "pgexport.json")
    cores = usable_cores()
    with tempfile.TemporaryDirectory(prefix="bench_batch-") as tmp:
        work = Path(tmp)
        demo = Path(args.demo_export) if args.demo_export else None
        if demo is None:
            from pgexport.api import export

            progress("exporting the demo model")
            demo = work / "demo"
            export(None, demo, validate=False, progress=None)
        result = {"images": args.images, "large_images": args.large_images, "new_tokens": args.new_tokens,
                  "cores": cores, "models": {}}
        progress("timing Ray's start-up alone")
        result["ray_startup"] = ray_startup()
        small = write_inputs(work / "small", args.images)
        result["models"]["demo"] = bench_model("demo", demo, small, work, args.new_tokens, cores, args.rounds)
        if folders:
            large = write_inputs(work / "large", args.large_images)
            for folder in folders:
                result["models"][folder.name] = bench_model(folder.name, folder, large, work, args.new_tokens,
                                                             cores, args.large_rounds)
    return write_report(args.out, result, render_markdown, "bench_batch.py", argv, packages=("onnxruntime", "numpy", "ray"))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
