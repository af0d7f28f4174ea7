"""Batch-1 decode of ONNX exports against the memory roofline: how fast could a token be?

    python benchmarks/bench_decode_roofline.py --threads 1 \\
        /tmp/pgexport-bench-quant/onnx-int8-L6 /tmp/pgexport-bench-quant/quantize-dynamic-int8-L6

At batch 1 every weight matrix is read once per token for one multiply-add per weight, so a
decode step cannot take less than (bytes it reads) / (memory read bandwidth). For each export
folder (our `decode.onnx` contract: `input_ids`, `attention_mask`, `past_key_values.*`), this
script

* times one decode step after a prompt of --past tokens (random KV cache), wall clock, the
  folders' sessions interleaved call by call;
* then profiles the same step in a second session per folder with ONNX Runtime's profiler, the
  folders' steps interleaved again (the kernel times and the wall times come from different calls
  and can differ by the machine's noise): kernel time per op type; the bytes each kernel reads besides its activation: the decode graph's
  initializers for weight ops (prepacked weights show up empty in the profile, so their size is
  taken from the graph by node name; ONNX Runtime keeps that name when it fuses, e.g.
  MatMulInteger -> MatMulIntegerToFloat), and the KV cache for attention's MatMuls;
* measures this machine's read bandwidth (a float32 dot product over --bandwidth-gib GiB with
  numpy's BLAS; on --threads threads when run as a script, which sets the BLAS thread count).

Roofline = bytes per token / bandwidth: no kernel can read them faster. Best case = roofline +
the time of the other kernels (norms, rotary, attention's softmax, ...): a decode step with
weight kernels at the roofline. Writes benchmarks/results/decode_roofline.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _threads(argv) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_known_args(argv)[0].threads


if __name__ == "__main__":  # BLAS threads are fixed when numpy loads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(_threads(sys.argv[1:]))

import json  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    export_folders, fmt_stats_ms, interleaved, machine_markdown, markdown_table, ort_session, progress, timed_call,
    write_report,
)

RESULTS = Path(__file__).parent / "results" / "decode_roofline"  # .json and .md
# Kernels that multiply by a matrix: a weight (an initializer: all of it is read per token) or,
# for attention's Q.K^T and P.V, the KV cache. Other kernels read activations, constants or a
# row of the embedding table (Gather): kilobytes, counted as "other kernels".
MATMUL_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "MatMulNBits", "MatMul",
              "FusedMatMul", "Gemm"}
DTYPE_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second a float32 dot product over `gib` GiB reads (best of `repeats`)."""
    x = np.random.default_rng(0).random(int(gib * 2**30) // 4, dtype=np.float32)
    np.dot(x, x)
    best = min(timed_call(lambda: np.dot(x, x)).seconds for _ in range(repeats))
    return x.nbytes / best


def decode_feeds(session, past: int) -> dict:
    """One token after `past` cached positions: random keys and values, an all-ones mask."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[2]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            feeds[i.name] = rng.standard_normal((1, heads, past, dim)).astype(np.float32)
    return feeds


def session(folder: Path, threads: int, profile_prefix: str | None = None):
    return ort_session(folder / "decode.onnx", threads, profile_prefix)


def listed_bytes(shapes: list[dict]) -> int:
    """Bytes of every input but the first (the activation) as the profiler lists them."""
    total = 0
    for entry in shapes[1:]:
        (dtype, shape), = entry.items()
        total += int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES.get(dtype, 4)
    return total


def weight_bytes(folder: Path) -> dict[str, int]:
    """Node name -> bytes of its initializer inputs after the first, in decode.onnx."""
    import onnx

    graph = onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph
    init = {t.name: int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            for t in graph.initializer}
    names = [n.name for n in graph.node]
    if "" in names or len(set(names)) != len(names):
        raise SystemExit(f"{folder / 'decode.onnx'} has unnamed or duplicate node names: its kernels cannot be "
                         "matched to their weights")
    return {n.name: sum(init.get(i, 0) for i in n.input[1:]) for n in graph.node}


def profile(folders: list[Path], threads: int, past: int, runs: int) -> dict[str, dict]:
    """Folder name -> per op type: kernel ms, calls, weight bytes and KV bytes per token. One
    profiled session per folder, their decode steps interleaved (a warm-up step each first)."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {f.name: session(f, threads, str(Path(tmp) / f"p{i}")) for i, f in enumerate(folders)}
        feeds = {name: decode_feeds(s, past) for name, s in sessions.items()}
        for _ in range(runs + 1):  # the first is a warm-up, left out below
            for name, s in sessions.items():
                s.run(None, feeds[name])
        events = {name: json.loads(Path(s.end_profiling()).read_text()) for name, s in sessions.items()}
    return {f.name: op_table(events[f.name], weight_bytes(f), runs) for f in folders}


def op_table(events: list[dict], graph_bytes: dict[str, int], runs: int) -> dict:
    """One session's profile events -> per op type, averaged over the `runs` steps after the first."""
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(run_starts) != runs + 1:
        raise RuntimeError(f"expected {runs + 1} model_run events in the profile, found {len(run_starts)}")
    per_op = defaultdict(lambda: {"ms": 0.0, "calls": 0.0, "weight_bytes": 0.0, "kv_bytes": 0.0})
    largest = {"bytes": 0}  # the node reading the most weight bytes (the LM head), on its own
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < run_starts[1]:
            continue
        op = e["args"]["op_name"]
        row = per_op[op]
        row["ms"] += e["dur"] / 1e3 / runs
        row["calls"] += 1  # divided by runs below (exact: no warm-up call counted)
        if op in MATMUL_OPS:
            node = e["name"][:-len("_kernel_time")]
            weights = graph_bytes.get(node, 0)
            row["weight_bytes"] += weights / runs
            if weights > largest["bytes"]:
                largest = {"node": node, "op": op, "bytes": weights, "ms": 0.0}
            if node == largest.get("node"):
                largest["ms"] += e["dur"] / 1e3 / runs
            if not weights:
                row["kv_bytes"] += listed_bytes(e["args"].get("input_type_shape", [])) / runs
    for row in per_op.values():
        row["calls"] /= runs
    return {"ops": dict(sorted(per_op.items(), key=lambda kv: -kv[1]["ms"])), "largest": largest}


def summarize(ops: dict, decode_ms: float, bandwidth: float) -> dict:
    """Totals of one folder: bytes per token, weight-op and other kernel ms, roofline, best case."""
    weight_ms = sum(r["ms"] for r in ops.values() if r["weight_bytes"])
    kernel_ms = sum(r["ms"] for r in ops.values())
    nbytes = sum(r["weight_bytes"] + r["kv_bytes"] for r in ops.values())
    roofline = nbytes / bandwidth * 1e3
    other = kernel_ms - weight_ms - sum(r["ms"] for r in ops.values() if r["kv_bytes"] and not r["weight_bytes"])
    return {"decode_ms": decode_ms, "bytes_per_token": nbytes, "weight_bytes_per_token": sum(r["weight_bytes"] for r in ops.values()),
            "kernel_ms": kernel_ms, "weight_op_ms": weight_ms, "other_kernel_ms": other, "roofline_ms": roofline,
            "best_case_ms": roofline + other}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="export folders (the first is compared with each other one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=260, help="cached positions (260: one 224-px image + a prompt)")
    ap.add_argument("--repeats", type=int, default=30, help="timed decode steps per folder")
    ap.add_argument("--profile-runs", type=int, default=10, help="profiled decode steps per folder (after a warm-up)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="GiB read to measure the bandwidth")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    folders = export_folders(ap, args.folders, "decode.onnx")

    progress(f"read bandwidth over {args.bandwidth_gib} GiB ...")
    bandwidth = read_bandwidth(args.bandwidth_gib)
    progress(f"  {bandwidth / 1e9:.1f} GB/s")
    progress("timing (interleaved) ...")
    sessions = {f.name: session(f, args.threads) for f in folders}
    feeds = {name: decode_feeds(s, args.past) for name, s in sessions.items()}
    timed = interleaved({name: (lambda s=s, x=feeds[name]: s.run(None, x)) for name, s in sessions.items()},
                        repeats=args.repeats, warmup=3, verbose=False, keep_results=False)
    del sessions
    result = {"threads": args.threads, "past": args.past, "bandwidth_gib": args.bandwidth_gib,
              "read_bandwidth_gbs": bandwidth / 1e9, "profile_runs": args.profile_runs, "folders": {}}
    progress("profiling (interleaved) ...")
    profiles = profile(folders, args.threads, args.past, args.profile_runs)
    for f in folders:
        ops, largest = profiles[f.name]["ops"], profiles[f.name]["largest"]
        stats = timed[f.name].stats
        r = {"path": str(f), "decode": stats, **summarize(ops, stats.median * 1e3, bandwidth), "ops": ops,
             "largest_weight_node": largest}
        result["folders"][f.name] = r
        progress(f"  {f.name}: {r['decode_ms']:.2f} ms/token, {r['bytes_per_token'] / 1e6:.0f} MB/token, "
                 f"roofline {r['roofline_ms']:.2f} ms, best case {r['best_case_ms']:.2f} ms")
    return write_report(args.out, result, markdown, "bench_decode_roofline.py", argv)


def markdown(r: dict, command: str) -> str:
    bw = r["read_bandwidth_gbs"]
    names = list(r["folders"])

    def gbs(nbytes, ms):
        return f"{nbytes / ms / 1e6:.1f}" if nbytes and ms else "-"

    lines = ["# Batch-1 decode against the memory roofline", "", f"`{command}`", "",
             f"- one decode step after {r['past']} cached positions, {r['threads']} thread(s), CPU execution provider",
             f"- read bandwidth: **{bw:.1f} GB/s** (float32 dot product over {r['bandwidth_gib']} GiB, best of 7)",
             "- MB read per token: the decode graph's weights (initializers of every kernel after its activation) "
             "plus the KV cache attention's MatMuls read",
             "- roofline: those bytes / the read bandwidth; best case: roofline + the other kernels' time "
             "(weight kernels at the roofline)",
             f"- wall: interleaved calls; kernel times: ONNX Runtime's profiler over {r['profile_runs']} later calls, "
             "interleaved too, in sessions of their own (wall and kernel times come from different calls)", "",
             markdown_table(["folder", "decode ms/token (wall)", "kernel ms", "weight-op ms", "other kernels ms",
                             "MB read/token", "GB/s in weight ops", "roofline ms", "best case ms", "wall / roofline"],
                            [[n, fmt_stats_ms(f["decode"], 2), f"{f['kernel_ms']:.2f}", f"{f['weight_op_ms']:.2f}",
                              f"{f['other_kernel_ms']:.2f}", f"{f['bytes_per_token'] / 1e6:.0f}",
                              gbs(f["weight_bytes_per_token"], f["weight_op_ms"]), f"{f['roofline_ms']:.2f}",
                              f"{f['best_case_ms']:.2f}",
                              f"{f['decode_ms'] / f['roofline_ms']:.2f}x" if f["roofline_ms"] else "-"]
                             for n, f in r["folders"].items()])]
    for other in names[1:]:
        a, b = r["folders"][names[0]], r["folders"][other]
        lines += ["", f"{names[0]} / {other}: {a['decode_ms'] / b['decode_ms']:.3f}x measured (wall); "
                      f"{a['best_case_ms'] / b['decode_ms']:.3f}x if {names[0]}'s weight kernels ran at the roofline "
                      f"and {other} as measured."]
    for n, f in r["folders"].items():
        big = f["largest_weight_node"]
        lines += ["", f"## {n}", "", f"Largest weight kernel: `{big['node']}` ({big['op']}), {big['bytes'] / 1e6:.0f} MB "
                  f"in {big['ms']:.2f} ms ({gbs(big['bytes'], big['ms'])} GB/s).", "", markdown_table(
            ["op type", "calls/token", "ms/token", "weight MB/token", "KV MB/token", "GB/s"],
            [[op, f"{row['calls']:g}", f"{row['ms']:.3f}",
              f"{row['weight_bytes'] / 1e6:.1f}" if row["weight_bytes"] else "",
              f"{row['kv_bytes'] / 1e6:.2f}" if row["kv_bytes"] else "",
              gbs(row["weight_bytes"] + row["kv_bytes"], row["ms"]) if row["weight_bytes"] + row["kv_bytes"] else ""]
             for op, row in f["ops"].items() if row["ms"] >= 0.05 or row["weight_bytes"] or row["kv_bytes"]])]
    lines += ["", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
