"""Batch-1 decode of ONNX exports against the memory roofline: how fast could a token be?

    python benchmarks/bench_decode_roofline.py --threads 1 \\
        --folder /tmp/pgexport-bench-quant/onnx-int8-L6 --folder /tmp/pgexport-bench-quant/quantize-dynamic-int8-L6

At batch 1 every weight matrix is read once per token and each is used for one multiply-add per
byte (int8), so decode time is bounded below by (weight bytes read per token) / (memory read
bandwidth). For each export folder (our `decode.onnx` contract: `input_ids`, `attention_mask`,
`past_key_values.*`), this script

* times one decode step after a prompt of --past tokens (random KV cache), wall clock, the
  folders' sessions interleaved pass by pass;
* profiles the same step with ONNX Runtime's profiler (a second session): kernel time per op
  type, and for the weight-reading ops (`DynamicQuantizeMatMul`, `MatMulIntegerToFloat`,
  `MatMulNBits`, ...) the bytes of their inputs after the first (weights, scales, zero points,
  or the KV cache for attention's MatMuls), hence the GB/s each op type reaches;
* measures this machine's read bandwidth on the same number of threads (a float32 dot product
  over 1 GiB, numpy's BLAS: it reads each byte once and does little else).

Roofline = bytes read per token / that bandwidth: no kernel can decode faster than that.
Writes benchmarks/results/decode_roofline.json and .md (or --out).
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
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    fmt_stats_ms,
    interleaved,
    machine_info,
    machine_markdown,
    markdown_table,
    progress,
    write_results,
)

RESULTS = Path(__file__).parent / "results" / "decode_roofline"  # .json and .md
WEIGHT_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "MatMulNBits", "MatMul", "FusedMatMul",
              "Gemm", "QGemm", "MatMulFpQ4"}
DTYPE_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second a float32 dot product over `gib` GiB reads (best of `repeats`)."""
    x = np.random.default_rng(0).random(int(gib * 2**30) // 4, dtype=np.float32)
    np.dot(x, x)
    best = min(_timed(lambda: np.dot(x, x)) for _ in range(repeats))
    return x.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(folder / "decode.onnx"), so, providers=["CPUExecutionProvider"])


def input_bytes(shapes: list[dict]) -> int:
    """Bytes of every input but the first (the activation) of a profiled node, as the profiler
    lists them (a prepacked weight shows up empty: `weight_bytes` has its size)."""
    total = 0
    for entry in shapes[1:]:
        (dtype, shape), = entry.items()
        total += int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES.get(dtype, 4)
    return total


def weight_bytes(folder: Path) -> dict[str, int]:
    """Node name -> bytes of its initializer inputs in decode.onnx (ONNX Runtime keeps the name
    of the node it fuses others into, e.g. MatMulInteger -> MatMulIntegerToFloat)."""
    import onnx
    from onnx import TensorProto as T

    sizes = {T.FLOAT: 4, T.FLOAT16: 2, T.BFLOAT16: 2, T.INT8: 1, T.UINT8: 1, T.INT32: 4, T.INT64: 8,
             T.INT4: 0.5, T.UINT4: 0.5}
    graph = onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph
    init = {t.name: int(np.prod(t.dims, dtype=np.int64) * sizes.get(t.data_type, 4)) for t in graph.initializer}
    return {n.name: sum(init.get(i, 0) for i in n.input[1:]) for n in graph.node}


def profile(folder: Path, threads: int, past: int, runs: int) -> dict:
    """Kernel time per op type (ms per token) and, for weight-reading ops, bytes per token."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(folder, threads, str(Path(tmp) / "p"))
        feeds = decode_feeds(s, past)
        for _ in range(runs + 1):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    graph_bytes = weight_bytes(folder)
    per_run = defaultdict(lambda: {"ms": 0.0, "calls": 0, "bytes": 0})
    skipped_first = set()  # the first (warm-up) call of each node is left out
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["name"] not in skipped_first:
            skipped_first.add(e["name"])
            continue
        op = e["args"]["op_name"]
        row = per_run[op]
        row["ms"] += e["dur"] / 1e3 / runs
        row["calls"] += 1
        if op in WEIGHT_OPS:
            node = e["name"][:-len("_kernel_time")]
            row["bytes"] += max(graph_bytes.get(node, 0), input_bytes(e["args"].get("input_type_shape", []))) / runs
    for row in per_run.values():
        row["calls"] //= runs
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]["ms"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", action="append", required=True, help="export folder (repeat; the first is 'ours')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=260, help="cached positions (260: one 224-px image + a prompt)")
    ap.add_argument("--repeats", type=int, default=30, help="timed decode steps per folder")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="GiB read to measure the bandwidth")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    folders = [Path(f) for f in args.folder]
    for f in folders:
        if not (f / "decode.onnx").is_file():
            ap.error(f"{f} has no decode.onnx: pass an export folder (pgexport onnx --out DIR)")

    progress(f"read bandwidth, {args.threads} thread(s) ...")
    bandwidth = read_bandwidth(args.bandwidth_gib)
    progress(f"  {bandwidth / 1e9:.1f} GB/s")
    result = {"threads": args.threads, "past": args.past, "read_bandwidth_gbs": bandwidth / 1e9, "folders": {}}
    progress("timing (interleaved) ...")
    sessions = {f.name: session(f, args.threads) for f in folders}
    feeds = {name: decode_feeds(s, args.past) for name, s in sessions.items()}
    # the calls return None: `interleaved` keeps each call's result, and keeping every output would
    # make each call fault in fresh pages for its own
    timed = interleaved({name: (lambda s=s, x=feeds[name]: s.run(None, x) and None) for name, s in sessions.items()},
                        repeats=args.repeats, warmup=3, verbose=False)
    del sessions
    for f in folders:
        progress(f"profiling {f.name} ...")
        result["folders"][f.name] = {"path": str(f), "ops": profile(f, args.threads, args.past, runs=10)}
    for name, m in timed.items():
        st = m.stats
        r = result["folders"][name]
        weights = {op: row for op, row in r["ops"].items() if row["bytes"]}
        r["decode_ms"] = st.median * 1e3
        r["decode"] = st
        r["bytes_per_token"] = sum(row["bytes"] for row in weights.values())
        r["weight_op_ms"] = sum(row["ms"] for row in weights.values())
        r["kernel_ms"] = sum(row["ms"] for row in r["ops"].values())
        r["roofline_ms"] = r["bytes_per_token"] / bandwidth * 1e3
        progress(f"  {name}: {r['decode_ms']:.2f} ms/token, {r['bytes_per_token'] / 1e6:.0f} MB/token, "
                 f"roofline {r['roofline_ms']:.2f} ms")
    info = machine_info(["onnxruntime", "numpy"])
    result["machine"] = info
    paths = write_results(args.out, result, markdown(result, " ".join(["python benchmarks/bench_decode_roofline.py"]
                                                                      + (argv if argv is not None else sys.argv[1:]))))
    progress("wrote " + ", ".join(map(str, paths)))
    return result


def markdown(r: dict, command: str) -> str:
    bw = r["read_bandwidth_gbs"]
    names = list(r["folders"])
    lines = ["# Batch-1 decode against the memory roofline", "", f"`{command}`", "",
             f"- one decode step after {r['past']} cached positions, {r['threads']} thread(s), CPU execution provider",
             f"- read bandwidth on {r['threads']} thread(s): **{bw:.1f} GB/s** (float32 dot product over 1 GiB, best of 7)",
             "- bytes per token: the inputs after the first of every weight-reading kernel, as ONNX Runtime's profiler "
             "lists them (weights, scales, zero points; the KV cache for attention's MatMuls)",
             "- roofline: bytes per token / read bandwidth, the fastest any kernel could decode", "",
             markdown_table(["folder", "decode ms/token (wall)", "kernel ms", "weight-op ms", "MB read/token",
                             "GB/s in weight ops", "roofline ms", "wall / roofline"],
                            [[n, fmt_stats_ms(f["decode"], 2), f"{f['kernel_ms']:.2f}", f"{f['weight_op_ms']:.2f}",
                              f"{f['bytes_per_token'] / 1e6:.0f}",
                              f"{f['bytes_per_token'] / f['weight_op_ms'] / 1e6:.1f}" if f["weight_op_ms"] else "-",
                              f"{f['roofline_ms']:.2f}", f"{f['decode_ms'] / f['roofline_ms']:.2f}x"]
                             for n, f in r["folders"].items()])]
    if len(names) > 1:
        a, b = (r["folders"][n] for n in names[:2])
        lines += ["", f"{names[0]} / {names[1]}: {a['decode_ms'] / b['decode_ms']:.3f}x measured; "
                      f"{a['roofline_ms'] / b['decode_ms']:.3f}x if {names[0]} ran at the roofline and "
                      f"{names[1]} as measured."]
    for n, f in r["folders"].items():
        lines += ["", f"## {n}", "", markdown_table(
            ["op type", "calls/token", "ms/token", "MB/token", "GB/s"],
            [[op, row["calls"], f"{row['ms']:.3f}", f"{row['bytes'] / 1e6:.1f}" if row["bytes"] else "",
              f"{row['bytes'] / row['ms'] / 1e6:.1f}" if row["bytes"] and row["ms"] else ""]
             for op, row in f["ops"].items() if row["ms"] >= 0.05 or row["bytes"]])]
    lines += ["", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
