"""Continuous batching against one-at-a-time and static batches, on the same requests in one run.

    python benchmarks/bench_engine.py /tmp/b3-6l/int8 /tmp/b3-6l/int4 --demo
    python benchmarks/bench_engine.py --demo --soak 2000 --out benchmarks/results/engine_soak

`/tmp/b3-6l/*`: the `paligemma-3b-pt-224` geometry with 6 decoder layers
(`common.reduced_config(cfg, text_layers=6)`), random weights, exported with
`export_folder(model, ..., quant=...)` (the folders bench_kv_cache.py measures). `--demo` adds
the built-in demo model (exported into a work folder first).

Per export, `--requests` requests (a seeded mix of caption, detect and question prompts on
generated images, each with its own max_new_tokens drawn from `--answers MIN,MAX`) are all
offered at once and served three ways (or those `--ways` names), one after another in this
process:

* `one at a time`: each request's own `generate` (batch 1), in arrival order;
* `static b8`: groups of `--rows` in arrival order, each group generated together until its
  longest answer ends (what `pgexport batch` did before the engine);
* `engine`: `pgexport.engine.Engine` with `--rows` rows.

Reported per way: output tokens/s (each request's own tokens over the whole run), request
latency p50/p99 (completion time from the common start), and how many requests' tokens differ
from one-at-a-time's (the default int8 format quantizes activations per call, so its rows may
depend on their neighbours; every other format must show 0). Also the raw ceiling: a loop of
`--rows`-row `decode_in_place` steps on a cache of the engine's length with nothing around it,
against the engine's own decode steps while all rows were busy, and the engine's per-step
overhead (the step's time outside ONNX Runtime: admission bookkeeping, masks, token choice,
detokenization, stop strings).

The random-weight 3B geometry never emits eos, so its answers have exactly their max_new_tokens;
the demo model's answers end at its eos (a few to tens of tokens) whatever the limit.

`--soak N` serves N requests on the demo model through one engine (`--rows` rows, 4 x rows
submitted ahead) and samples this process's RSS every N/20 requests: reported is the RSS after
the first tenth against the end.
Writes benchmarks/results/engine.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    current_rss_bytes, export_folders, machine_markdown, markdown_table, percentile, progress, write_report,
)
from pgexport.engine import Engine  # noqa: E402
from pgexport.engine.engine import left_padded  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402
from pgexport.train.dataset import make_examples, render  # noqa: E402

PROMPTS = ["caption en", "detect circle", "detect square", "answer en how many shapes are there?",
           "answer en what color is the square?", "answer en where is the circle?"]


def workload(model: OnnxPaliGemma, count: int, answers: tuple[int, int], seed: int = 0) -> list[dict]:
    """Synthetic shape scenes (the demo model's kind of picture; the 3B geometry's random
    weights do not care) with mixed prompts and answer limits."""
    rng = random.Random(seed)
    scenes = [render(scene) for scene, _ in make_examples(seed=99 + seed, num_images=count, split="test")]
    out = []
    for i in range(count):
        batch = model.processor(images=[scenes[i]], prompts=[rng.choice(PROMPTS)])
        out.append({"ids": batch["input_ids"][0], "pixels": batch["pixel_values"][0],
                    "max_new": rng.randint(*answers)})
    return out


def trim(tokens, eos: int) -> list[int]:
    tokens = list(map(int, tokens))
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def one_at_a_time(model: OnnxPaliGemma, work: list[dict]) -> tuple[list, list, float]:
    eos = model.manifest.eos_token_id
    t0, done, outs = time.perf_counter(), [], []
    for r in work:
        ids = r["ids"][None]
        outs.append(trim(model.generate_ids(ids, np.ones_like(ids), r["pixels"][None], r["max_new"])[0], eos))
        done.append(time.perf_counter() - t0)
    return outs, done, time.perf_counter() - t0


def static_batches(model: OnnxPaliGemma, work: list[dict], rows: int) -> tuple[list, list, float]:
    eos = model.manifest.eos_token_id
    t0, done, outs = time.perf_counter(), [], []
    for g in range(0, len(work), rows):
        group = work[g:g + rows]
        ids, mask = left_padded([r["ids"] for r in group], model.manifest.pad_token_id)
        out = model.generate_ids(ids, mask, np.stack([r["pixels"] for r in group]), max(r["max_new"] for r in group))
        finished = time.perf_counter() - t0
        for j, r in enumerate(group):
            outs.append(trim(out[j][:r["max_new"]], eos))
            done.append(finished)
    return outs, done, time.perf_counter() - t0


def engine_run(model: OnnxPaliGemma, work: list[dict], rows: int, max_len: int) -> tuple[list, list, float, Engine]:
    engine = Engine(model, max_batch=rows, max_len=max_len, max_new_tokens=max(r["max_new"] for r in work),
                    record_steps=True)
    t0 = time.perf_counter()
    handles = [engine.submit_ids(r["ids"], r["pixels"], r["max_new"]) for r in work]
    outs = [h.result().token_ids for h in handles]
    total = time.perf_counter() - t0
    engine.close()
    done = [h.timing.finished - t0 for h in handles]
    return outs, done, total, engine


def raw_ceiling(model: OnnxPaliGemma, rows: int, max_len: int, prompt: int, steps: int) -> float:
    """Seconds per `rows`-row decode step with nothing around it (cache of `max_len` slots, the
    first `prompt` + step slots real)."""
    cache = model.new_cache(rows, max_len)
    mask = np.zeros((rows, max_len), np.int64)
    mask[:, :prompt] = 1
    tokens = np.full(rows, 3, np.int64)
    times = []
    for i in range(steps):
        slot = prompt + i
        mask[:, slot] = 1
        t = time.perf_counter()
        model.decode_in_place(tokens, mask, cache, slot)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def measure(folder: Path, args) -> dict:
    progress(f"{folder}: loading")
    model = OnnxPaliGemma(folder, threads=args.threads)
    work = workload(model, args.requests, args.answers)
    eos = model.manifest.eos_token_id
    longest = max(len(r["ids"]) for r in work)
    max_len = longest + 2 * max(r["max_new"] for r in work)
    if model.manifest.max_position_embeddings:
        max_len = min(max_len, model.manifest.max_position_embeddings)
    result = {"export": str(folder), "requests": len(work), "prompt_tokens": sorted({len(r["ids"]) for r in work}),
              "max_new_tokens": [r["max_new"] for r in work], "max_len": max_len, "modes": {}}
    ways = {"one": ("one at a time", lambda: one_at_a_time(model, work)),
            "static": (f"static b{args.rows}", lambda: static_batches(model, work, args.rows)),
            "engine": (f"engine {args.rows} rows", lambda: engine_run(model, work, args.rows, max_len))}
    reference = None
    for name, run in (ways[w] for w in args.ways):
        progress(f"{folder.name}: {name}")
        outs, done, total, *extra = run()
        tokens = sum(len(o) for o in outs)
        reference = reference or outs
        row = {"seconds": total, "output_tokens": tokens, "tokens_per_second": tokens / total,
               "latency_p50_s": percentile(done, 50), "latency_p99_s": percentile(done, 99),
               "requests_differing_from_first_way": sum(a != b for a, b in zip(outs, reference))}
        if extra:
            stats = extra[0].stats
            full = [(s, g, e) for n, s, g, e in stats.step_log if n == args.rows]
            decode = sum(s for _, s, _, _ in stats.step_log)
            row.update(steps=stats.steps, mean_rows=stats.decode_rows / max(stats.steps, 1), prefills=stats.prefills,
                       compactions=stats.compactions, compaction_seconds=stats.compaction_seconds,
                       full_steps=len(full),
                       full_step_ms=1e3 * float(np.median([s for s, _, _ in full])) if full else None,
                       full_step_graph_ms=1e3 * float(np.median([g for _, g, _ in full])) if full else None,
                       overhead_ms_per_step=1e3 * float(np.median([s - g for s, g, _ in full])) if full else None,
                       emit_ms_per_step=1e3 * float(np.median([e for _, _, e in full])) if full else None,
                       loop_outside_graph_fraction=1 - stats.graph_seconds / stats.loop_seconds,
                       decode_seconds=decode, admission_seconds=stats.loop_seconds - decode)
        result["modes"][name] = row
        progress(f"{folder.name}: {name}: {tokens / total:.2f} tokens/s")
    raw = raw_ceiling(model, args.rows, max_len, longest, args.raw_steps)
    result["raw_step_ms"] = raw * 1e3
    result["raw_tokens_per_second"] = args.rows / raw
    model.close()
    return result


def soak(folder: Path, count: int, rows: int, threads: int) -> dict:
    model = OnnxPaliGemma(folder, threads=threads)
    work = workload(model, 64, (8, 40), seed=5)
    engine = Engine(model, max_batch=rows, max_new_tokens=40)
    samples, flight = [], []
    every = max(count // 20, 1)
    for i in range(count):
        r = work[i % len(work)]
        flight.append(engine.submit_ids(r["ids"], r["pixels"], r["max_new"]))
        if len(flight) >= 4 * rows:
            flight.pop(0).result()
        if (i + 1) % every == 0:
            samples.append({"requests": i + 1, "rss_mib": current_rss_bytes() / 2**20})
    for h in flight:
        h.result()
    engine.close()
    first = next(s for s in samples if s["requests"] >= count // 10)
    return {"requests": count, "samples": samples, "rss_after_first_tenth_mib": first["rss_mib"],
            "rss_end_mib": samples[-1]["rss_mib"], "growth": samples[-1]["rss_mib"] / first["rss_mib"] - 1}


def report(result: dict, command: str) -> str:
    lines = ["# Continuous batching: the engine against one at a time and static batches", "", f"`{command}`", ""]
    for r in result["exports"]:
        lines += [f"## {r['export']}", "",
                  f"{r['requests']} requests offered at once, prompts of {r['prompt_tokens']} tokens, answers of "
                  f"{min(r['max_new_tokens'])}-{max(r['max_new_tokens'])} tokens at most, engine max_len {r['max_len']}.", ""]
        first = next(iter(r["modes"]))
        base = r["modes"][first]["tokens_per_second"]
        rows = [[name, f"{m['output_tokens']}", f"{m['seconds']:.1f}", f"{m['tokens_per_second']:.2f}",
                 f"{m['tokens_per_second'] / base:.2f}x", f"{m['latency_p50_s']:.1f}", f"{m['latency_p99_s']:.1f}",
                 str(m["requests_differing_from_first_way"])] for name, m in r["modes"].items()]
        lines += [markdown_table(["way", "output tokens", "s", "tokens/s", f"vs {first}", "latency p50 s",
                                  "latency p99 s", f"requests differing from {first}"], rows), ""]
        e = next((m for name, m in r["modes"].items() if name.startswith("engine")), None)
        static = next((m for name, m in r["modes"].items() if name.startswith("static")), None)
        if e and static:
            lines.append(f"Engine against static batches: {e['tokens_per_second'] / static['tokens_per_second']:.2f}x.")
        if e and e.get("full_step_ms"):
            raw = r["raw_step_ms"]
            lines += [f"Decode steps with every row busy: {e['full_steps']} of {e['steps']} (mean rows {e['mean_rows']:.2f}); "
                      f"median step {e['full_step_ms']:.1f} ms, of which ONNX Runtime {e['full_step_graph_ms']:.1f} ms "
                      f"and the engine {e['overhead_ms_per_step']:.2f} ms (choosing and handing out the tokens: "
                      f"{e['emit_ms_per_step']:.2f} ms). Raw loop of the same steps: {raw:.1f} ms, so "
                      f"the engine's decode tokens/s are {raw / e['full_step_ms']:.1%} of the raw ceiling.",
                      f"Engine loop time outside ONNX Runtime (prefill admission included): "
                      f"{e['loop_outside_graph_fraction']:.1%}; compactions: {e['compactions']}, moving rows took "
                      f"{e['compaction_seconds']:.2f} s ({e['compaction_seconds'] / e['seconds']:.2%} of the run); "
                      f"prefill calls: {e['prefills']}."]
            if "decode_seconds" in e:
                lines.append(f"Of the engine's loop time, decode steps took {e['decode_seconds']:.1f} s and admissions "
                             f"(image encoding and prompt prefill) {e['admission_seconds']:.1f} s: a prefill is compute-bound "
                             "and costs the same in every way, so it bounds what batching the decode can gain.")
        lines.append("")
    if result.get("soak"):
        s = result["soak"]
        lines += ["## RSS over many requests (demo model)", "",
                  f"{s['requests']} requests through one engine: RSS {s['rss_after_first_tenth_mib']:.1f} MiB after the "
                  f"first tenth, {s['rss_end_mib']:.1f} MiB at the end ({s['growth']:+.1%}).", "",
                  markdown_table(["requests", "RSS MiB"], [[x["requests"], f"{x['rss_mib']:.1f}"] for x in s["samples"]]), ""]
    lines += [machine_markdown(result["machine"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="*", help="export folders (pgexport onnx --out DIR)")
    ap.add_argument("--demo", action="store_true", help="also the built-in demo model (exported into a work folder)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--answers", default="8,128", help="MIN,MAX max_new_tokens of the requests")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw-steps", type=int, default=12)
    ap.add_argument("--ways", default="one,static,engine",
                    help="which ways to serve the requests, of one,static,engine (e.g. engine: formats side by side)")
    ap.add_argument("--soak", type=int, default=0, help="requests for the RSS soak on the demo model (0: none)")
    ap.add_argument("--out", default="benchmarks/results/engine")
    args = ap.parse_args(argv)
    args.answers = tuple(int(x) for x in args.answers.split(","))
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not args.ways or set(args.ways) - {"one", "static", "engine"}:
        ap.error(f"--ways takes one, static and/or engine (comma-separated), not {args.ways}")
    folders = export_folders(ap, args.exports, "decoder.onnx")
    if not folders and not args.demo and not args.soak:
        ap.error("pass export folders and/or --demo / --soak N")
    work = Path(tempfile.mkdtemp(prefix="pgexport-bench-engine-"))
    demo = None
    if args.demo or args.soak:
        from pgexport.api import export

        demo = work / "demo"
        progress("exporting the demo model")
        export(None, demo, validate=False, progress=None)
    result = {"exports": [measure(f, args) for f in ([demo] if args.demo else []) + folders]}
    if args.soak:
        progress(f"soak: {args.soak} requests")
        result["soak"] = soak(demo, args.soak, args.rows, args.threads)
    return write_report(args.out, result, report, "bench_engine.py", argv)


if __name__ == "__main__":
    sys.exit(main())
