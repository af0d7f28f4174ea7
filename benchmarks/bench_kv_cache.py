"""Decode ms/step against the KV cache's length: a cache copied every step, and one written in place.

    python benchmarks/bench_kv_cache.py /tmp/b3-6l/int8 /tmp/b3-6l/int4

For each export folder (written by this pgexport: it holds decode.onnx and decoder.onnx), batch
size and past length, one decode step is timed two ways in the same process (per batch size,
every past length and both modes interleaved in the same rounds):

* `copying`: decode.onnx through `OnnxPaliGemma(single_decoder=False)` — past in, past + 1 out,
  so every step copies the whole cache of every layer into new tensors (the three-graph contract);
* `in place`: decoder.onnx through the runtime's stepper path (`new_cache` + `run_in_place`) —
  buffers allocated once for past + --new-tokens slots, bound as both `past` and `present`, the
  step's keys scattered into them.

The cache holds random values (the step's cost does not depend on them), so a 4110-token past
(the `-896` geometry: 4096 image tokens and a prompt) needs no 4110-token prefill. The machine's
read bandwidth is measured in the same run (a float32 dot product over --bandwidth-gib GiB), and
the report gives, per mode, how much longer a step at the longest past takes than at the shortest,
in units of the time to read the longest cache once at that bandwidth (attention must read it
once; copying it costs a read and a write more).
Writes benchmarks/results/kv_cache.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks.bench_decode_roofline import op_table, read_bandwidth  # noqa: E402
from benchmarks.common import (  # noqa: E402
    export_folders, fmt_stats_ms, interleaved, machine_markdown, markdown_table, progress, write_report,
)
import pgexport.runtime.session as runtime_session  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kv_cache"  # .json and .md
MODES = ("copying", "in place")
# What attention runs in the quantized exports' decoder (their weight matmuls are MatMulNBits /
# DynamicQuantizeMatMul): the scores, the mask, the softmax and the weighted sum of the values.
ATTENTION_OPS = ("FusedMatMul", "MatMul", "Where", "Softmax")


def step_calls(split: OnnxPaliGemma | None, single: OnnxPaliGemma, batch: int, past: int, new_tokens: int, seed: int,
               modes: tuple[str, ...] = MODES) -> dict:
    """One decode step at `past` cached positions, each mode as a zero-argument call."""
    m = single.manifest
    rng = np.random.default_rng(seed)
    dtype = np.float16 if m.dtype == "float16" else np.float32
    shape = (batch, m.num_kv_heads, past, m.head_dim)
    cache = [rng.standard_normal(shape).astype(dtype) for _ in range(2 * m.num_layers)]
    tokens = np.full((batch, 1), 7, np.int64)
    mask = np.ones((batch, past + 1), np.int64)  # copying: the cache as the previous step returned it
    buffers = single.new_cache(batch, past + new_tokens, start=cache)  # in place: room for new_tokens more
    buffer_mask = np.zeros((batch, past + new_tokens), np.int64)
    buffer_mask[:, :past + 1] = 1
    calls = {"copying": lambda: split.decode(tokens, mask, cache),
             "in place": lambda: single.decode_in_place(tokens, buffer_mask, buffers, past)}
    return {mode: calls[mode] for mode in modes}


@contextlib.contextmanager
def profiled_sessions(folder: str):
    """Sessions created inside write ONNX Runtime profiles under `folder`. The runtime takes no
    session options from its caller, so its module's SessionOptions is swapped for the duration."""
    class Profiling(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(Path(folder) / "ort")

    original = runtime_session.ort.SessionOptions
    runtime_session.ort.SessionOptions = Profiling
    try:
        yield
    finally:
        runtime_session.ort.SessionOptions = original


def kernel_ms_by_op(folder: Path, batch: int, past: int, new_tokens: int, steps: int) -> dict[str, float]:
    """ms per in-place decode step spent in each operator type (ONNX Runtime's profile, kernel time only)."""
    with tempfile.TemporaryDirectory() as tmp:
        with profiled_sessions(tmp):
            single = OnnxPaliGemma(folder, single_decoder=True)
        step = step_calls(None, single, batch, past, new_tokens, seed=0, modes=("in place",))["in place"]
        for _ in range(steps + 1):  # the first is a warm-up, left out by op_table
            step()
        trace = json.loads(Path(single.decoder_session.end_profiling()).read_text())
        single.close()
    return {op: row["ms"] for op, row in op_table(trace, {}, steps)["ops"].items()}


def cache_bytes(m, batch: int, past: int, itemsize: int) -> int:
    return 2 * m.num_layers * batch * m.num_kv_heads * past * m.head_dim * itemsize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="export folders written by this pgexport (with decoder.onnx)")
    ap.add_argument("--past", default="270,1030,4110", help="cached positions (comma-separated)")
    ap.add_argument("--batch", default="1,4", help="batch sizes (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=32, help="free slots of the in-place buffers")
    ap.add_argument("--repeats", type=int, default=30, help="rounds; each times one step per mode and past")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    ap.add_argument("--profile-steps", type=int, default=30,
                    help="in-place steps profiled at the shortest and longest past, quantized exports (kernel time by operator; 0: skip)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    folders = export_folders(ap, args.folders, "decoder.onnx")
    pasts = [int(x) for x in args.past.split(",")]
    batches = [int(x) for x in args.batch.split(",")]

    progress(f"read bandwidth over {args.bandwidth_gib} GiB ...")
    bandwidth = read_bandwidth(args.bandwidth_gib)
    progress(f"  {bandwidth / 1e9:.1f} GB/s")
    result = {"pasts": pasts, "batches": batches, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "profile_steps": args.profile_steps,
              "threads": args.threads, "read_bandwidth_gbs": bandwidth / 1e9, "folders": {}}
    for folder in folders:
        split = OnnxPaliGemma(folder, threads=args.threads, single_decoder=False)
        single = OnnxPaliGemma(folder, threads=args.threads, single_decoder=True)
        m = single.manifest
        itemsize = 2 if m.dtype == "float16" else 4
        rows, summary = {}, {}
        for batch in batches:
            # Every past length and both modes interleaved in the same rounds, so that the machine's
            # drift between rounds affects all points alike; the growth is taken per round.
            calls = {}
            for past in pasts:
                for mode, fn in step_calls(split, single, batch, past, args.new_tokens, seed=past + batch).items():
                    calls[f"{mode}@{past}"] = fn
            progress(f"{folder.name} batch {batch}: pasts {pasts}, {args.repeats} rounds ...")
            timed = interleaved(calls, repeats=args.repeats, warmup=3, verbose=False, keep_results=False)
            del calls
            for past in pasts:
                rows[f"{batch}/{past}"] = {"batch": batch, "past": past,
                                           "cache_bytes": cache_bytes(m, batch, past, itemsize),
                                           **{mode: timed[f"{mode}@{past}"].stats for mode in MODES}}
            read_ms = cache_bytes(m, batch, pasts[-1], itemsize) / bandwidth * 1e3
            summary[str(batch)] = {"cache_read_ms": read_ms}
            for mode in MODES:
                lo, hi = timed[f"{mode}@{pasts[0]}"].runs, timed[f"{mode}@{pasts[-1]}"].runs
                growth_ms = float(np.median([(h.seconds - l.seconds) for h, l in zip(hi, lo)])) * 1e3
                summary[str(batch)][mode] = {"growth_ms": growth_ms, "growth_in_cache_reads": growth_ms / read_ms}
            if args.profile_steps and m.quantization:  # where the in-place growth goes, from ONNX Runtime's own kernel timings
                progress(f"{folder.name} batch {batch}: profiling {args.profile_steps} in-place steps ...")
                lo, hi = (kernel_ms_by_op(folder, batch, past, args.new_tokens, args.profile_steps)
                          for past in (pasts[0], pasts[-1]))
                by_op = {op: hi.get(op, 0.0) - lo.get(op, 0.0) for op in set(lo) | set(hi)}
                # Only attention's operators depend on the past; the weight kernels' difference
                # between the two profiles is the machine's noise.
                growth = sum(by_op.get(op, 0.0) for op in ATTENTION_OPS)
                summary[str(batch)]["kernels"] = {
                    "growth_ms": growth, "growth_in_cache_reads": growth / read_ms,
                    "ms_per_step": [sum(lo.values()), sum(hi.values())],
                    "growth_by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
        split.close()
        single.close()
        result["folders"][folder.name] = {"path": str(folder), "quantization": m.quantization, "layers": m.num_layers,
                                          "kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "rows": rows,
                                          "summary": summary}
    return write_report(args.out, result, markdown, "bench_kv_cache.py", argv)


def markdown(r: dict, command: str) -> str:
    lines = ["# Decode ms/step against the KV cache's length", "", f"`{command}`", "",
             f"- one decode step after `past` cached positions (random cache values); per batch size, {r['repeats']} "
             "rounds, each timing one step of both modes at every past length (rotated order): median (p10-p90) ms",
             "- copying: decode.onnx (past in, past + 1 out: the cache is copied every step); in place: decoder.onnx "
             f"with buffers of past + {r['new_tokens']} slots bound as both past and present",
             f"- read bandwidth: **{r['read_bandwidth_gbs']:.1f} GB/s** (float32 dot product, best of 7)", ""]
    for name, f in r["folders"].items():
        lines += [f"## {name}", "", f"{f['layers']} decoder layers, {f['kv_heads']} KV head(s) of {f['head_dim']}; "
                  f"quantization {f['quantization']}", "",
                  markdown_table(["batch", "past", "cache MB", "copying ms/step", "in place ms/step", "copying / in place"],
                                 [[row["batch"], row["past"], f"{row['cache_bytes'] / 1e6:.0f}",
                                   fmt_stats_ms(row["copying"], 2), fmt_stats_ms(row["in place"], 2),
                                   f"{row['copying'].median / row['in place'].median:.2f}x"]
                                  for row in f["rows"].values()]), "",
                  f"Step time growth from past {r['pasts'][0]} to {r['pasts'][-1]} (median over the rounds of the "
                  "difference within a round), in units of the time to read the "
                  f"cache at past {r['pasts'][-1]} once:", "",
                  markdown_table(["batch", "cache read ms", "copying: growth ms", "copying: cache reads",
                                  "in place: growth ms", "in place: cache reads"],
                                 [[b, f"{s['cache_read_ms']:.2f}", f"{s['copying']['growth_ms']:.2f}",
                                   f"{s['copying']['growth_in_cache_reads']:.2f}", f"{s['in place']['growth_ms']:.2f}",
                                   f"{s['in place']['growth_in_cache_reads']:.2f}"]
                                  for b, s in f["summary"].items()]), ""]
        kernels = {b: s["kernels"] for b, s in f["summary"].items() if "kernels" in s}
        if kernels:
            lines += [f"In place, ONNX Runtime's kernel time (a profile of {r['profile_steps']} steps at each end; no "
                      "Python, binding or scheduling time): the growth of attention's operators "
                      f"({', '.join(ATTENTION_OPS)}), and each operator's change:", "",
                      markdown_table(["batch", "kernel ms/step, shortest / longest past", "attention growth ms",
                                      "cache reads", "change by operator, ms"],
                                     [[b, f"{k['ms_per_step'][0]:.1f} / {k['ms_per_step'][1]:.1f}",
                                       f"{k['growth_ms']:.2f}", f"{k['growth_in_cache_reads']:.2f}",
                                       ", ".join(f"{op} {ms:.2f}" for op, ms in list(k["growth_by_op_ms"].items())[:6])]
                                      for b, k in kernels.items()]), ""]
    lines += [machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
