"""One quantized linear layer per ONNX Runtime kernel and format, side by side (CPU).

    python benchmarks/bench_matmul_kernels.py                      # 260 x 2048 -> 16384, 1 thread
    python benchmarks/bench_matmul_kernels.py --rows 1 --k 2048 --n 16384

Each variant is a one-node graph holding the same random `[K, N]` weight, quantized the way our
exporter writes it (`exporters/quantize.py`): `DynamicQuantizeMatMul` (int8 per output column,
symmetric and asymmetric) and `MatMulNBits` (4 and 8 bits, several block sizes, accuracy level 4
and 0). The sessions keep ONNX Runtime's weight prepacking; the timed calls are interleaved. The
rows are the activations: 260 is a 224-px prompt's prefill, 1 a decode step. Reports ms per call,
the ratio to `DynamicQuantizeMatMul`, and the relative error against the float product.
Writes benchmarks/results/matmul_kernels.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

RESULTS = Path(__file__).parent / "results" / "matmul_kernels"  # .json and .md


def variants(blocks: list[int]) -> dict[str, dict]:
    """name -> how to quantize: the int8 dynamic formats, then MatMulNBits by bits and block."""
    out = {"DynamicQuantizeMatMul sym": {"op": "dynamic", "symmetric": True},
           "DynamicQuantizeMatMul asym": {"op": "dynamic", "symmetric": False}}
    for bits in (4, 8):
        for block in blocks:
            for sym in (False, True) if bits == 4 else (True,):
                out[f"MatMulNBits {bits}-bit b{block} {'sym' if sym else 'asym'}"] = {
                    "op": "nbits", "bits": bits, "block": block, "symmetric": sym, "accuracy_level": 4}
    out[f"MatMulNBits 4-bit b{blocks[-1]} asym acc0"] = {"op": "nbits", "bits": 4, "block": blocks[-1],
                                                         "symmetric": False, "accuracy_level": 0}
    return out


def one_node_session(w: np.ndarray, v: dict, threads: int):
    """An ORT session computing A @ w with `w` quantized as `v` says."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pgexport.exporters.quantize import MS_DOMAIN, NBitsWeight, quantize_columns_int8

    k, n = w.shape
    if v["op"] == "dynamic":
        q, scale, zp = quantize_columns_int8(w, v["symmetric"])
        arrays = [q, scale] + ([zp] if zp is not None else [])
        node = helper.make_node("DynamicQuantizeMatMul", ["A"] + [f"w{i}" for i in range(len(arrays))], ["Y"],
                                domain=MS_DOMAIN)
    else:
        nb = NBitsWeight.quantize(lambda a, b: w.T[a:b], n, k, v["bits"], v["block"], v["symmetric"])
        arrays = [nb.b, nb.scales.reshape(-1)] + ([nb.zero_points.reshape(-1)] if nb.zero_points is not None else [])
        node = helper.make_node("MatMulNBits", ["A"] + [f"w{i}" for i in range(len(arrays))], ["Y"], domain=MS_DOMAIN,
                                K=k, N=n, bits=v["bits"], block_size=v["block"], accuracy_level=v["accuracy_level"])
    graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(arrays)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=260, help="activation rows (260: a 224-px prefill; 1: decode)")
    ap.add_argument("--k", type=int, default=2048, help="input features")
    ap.add_argument("--n", type=int, default=16384, help="output features")
    ap.add_argument("--blocks", default="32,64,128,256", help="MatMulNBits block sizes, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    reference = a @ w
    chosen = variants([int(b) for b in args.blocks.split(",")])
    sessions, errors = {}, {}
    for name, v in chosen.items():
        progress(f"quantizing: {name}")
        s = one_node_session(w, v, args.threads)
        y = s.run(None, {"A": a})[0]
        errors[name] = float(np.abs(y - reference).max() / np.abs(reference).max())
        sessions[name] = s
    # the calls return None: `interleaved` keeps each call's result, and keeping every output would
    # make each call fault in fresh pages for its own
    timed = interleaved({name: (lambda s=s: s.run(None, {"A": a}) and None) for name, s in sessions.items()},
                        repeats=args.repeats, warmup=1, verbose=False)
    base = timed["DynamicQuantizeMatMul sym"].stats.median
    rows = {name: {**chosen[name], "stats": m.stats, "vs_dynamic_sym": m.stats.median / base,
                   "max_rel_error": errors[name]} for name, m in timed.items()}
    result = {"rows": args.rows, "k": args.k, "n": args.n, "threads": args.threads, "variants": rows,
              "machine": machine_info(["onnxruntime", "numpy"])}
    command = " ".join(["python benchmarks/bench_matmul_kernels.py"] + list(argv if argv is not None else sys.argv[1:]))
    lines = ["# One quantized linear layer per kernel", "", f"`{command}`", "",
             f"- A `[{args.rows}, {args.k}]` float32 times a random `[{args.k}, {args.n}]` weight (std 0.02), "
             f"{args.threads} thread(s), prepacking on, {args.repeats} interleaved calls each; median (p10-p90) ms",
             "- error: max |Y - A @ W| / max |A @ W| (activation quantization included)", "",
             markdown_table(["variant", "ms", "vs DynamicQuantizeMatMul sym", "error"],
                            [[n, fmt_stats_ms(r["stats"], 2), f"{r['vs_dynamic_sym']:.2f}x", f"{r['max_rel_error']:.4f}"]
                             for n, r in rows.items()]),
             "", machine_markdown(result["machine"])]
    paths = write_results(args.out, result, "\n".join(lines) + "\n")
    progress("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
