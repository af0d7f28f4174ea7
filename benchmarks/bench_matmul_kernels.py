"""One quantized linear layer per ONNX Runtime kernel and format, side by side (CPU).

    python benchmarks/bench_matmul_kernels.py                      # 260 x 2048 -> 16384, 1 thread
    python benchmarks/bench_matmul_kernels.py --rows 1 --k 2048 --n 16384

Each variant is a one-MatMul float graph holding the same random `[K, N]` weight, rewritten by
the exporter's quantizer (`exporters/quantize.quantize_folder`, as `pgexport onnx --quant` does):
`DynamicQuantizeMatMul` (int8 per output column, symmetric and asymmetric), the rowwise int8
(`MatMulInteger` with activations quantized per row, batch-invariant) and `MatMulNBits` (4
and 8 bits, several block sizes, accuracy level 4; the default int4 block also at level 0). The
sessions keep ONNX Runtime's weight prepacking; the timed calls are interleaved. The rows are
the activations: 260 is a 224-px prompt's prefill, 1 a decode step. Reports ms per call,
the ratio to `DynamicQuantizeMatMul`, and the relative error against the float product.
Writes benchmarks/results/matmul_kernels.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    fmt_stats_ms, interleaved, machine_markdown, markdown_table, ort_session, progress, write_report,
)

from pgexport.errors import PgExportError  # noqa: E402
from pgexport.exporters.quantize import DEFAULT_BLOCK_SIZE, check_block_size  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "matmul_kernels"  # .json and .md


def variants(blocks: list[int]) -> dict[str, dict]:
    """name -> `QuantOptions.create` arguments: the dynamic and rowwise int8 formats, then MatMulNBits by bits
    and block (and the default int4 block at accuracy level 0, i.e. fp32 compute)."""
    out = {"DynamicQuantizeMatMul sym": {"quant": "int8", "int8_format": "dynamic", "symmetric": True},
           "DynamicQuantizeMatMul asym": {"quant": "int8", "int8_format": "dynamic", "symmetric": False},
           "MatMulInteger rows sym": {"quant": "int8", "int8_format": "rowwise", "symmetric": True}}
    for bits in (4, 8):
        for block in blocks:
            for sym in (False, True) if bits == 4 else (True,):
                out[f"MatMulNBits {bits}-bit b{block} {'sym' if sym else 'asym'}"] = {
                    "quant": f"int{bits}", "int8_format": "nbits", "block_size": block, "symmetric": sym}
    block = DEFAULT_BLOCK_SIZE[4]
    out[f"MatMulNBits 4-bit b{block} asym acc0"] = {"quant": "int4", "block_size": block, "symmetric": False,
                                                    "accuracy_level": 0}
    return out


def quantized_session(w: np.ndarray, options: dict, folder: Path, threads: int):
    """An ORT session computing A @ w, with `w` quantized by the exporter's quantizer: a one-MatMul
    float graph in `folder`, rewritten by `quantize_folder` as it rewrites an export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pgexport.exporters.quantize import QuantOptions, quantize_folder

    k, n = w.shape
    folder.mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="linear")], "linear",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "linear.onnx"))
    quantize_folder(folder, QuantOptions.create(**options))
    return ort_session(folder / "linear.onnx", threads)


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
    try:
        blocks = [check_block_size(int(b)) for b in args.blocks.split(",")]
    except (ValueError, PgExportError) as e:
        ap.error(f"--blocks: {e}")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    a = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    reference = a @ w
    chosen = variants(blocks)
    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(chosen.items()):
            progress(f"quantizing: {name}")
            s = quantized_session(w, options, Path(tmp) / str(i), args.threads)
            y = s.run(None, {"A": a})[0]
            errors[name] = float(np.abs(y - reference).max() / np.abs(reference).max())
            sessions[name] = s
    timed = interleaved({name: (lambda s=s: s.run(None, {"A": a})) for name, s in sessions.items()},
                        repeats=args.repeats, warmup=1, verbose=False, keep_results=False)
    base = timed["DynamicQuantizeMatMul sym"].stats.median
    rows = {name: {"options": chosen[name], "stats": m.stats, "vs_dynamic_sym": m.stats.median / base,
                   "max_rel_error": errors[name]} for name, m in timed.items()}
    result = {"rows": args.rows, "k": args.k, "n": args.n, "threads": args.threads, "repeats": args.repeats,
              "variants": rows}
    return write_report(args.out, result, markdown, "bench_matmul_kernels.py", argv)


def markdown(r: dict, command: str) -> str:
    lines = ["# One quantized linear layer per kernel", "", f"`{command}`", "",
             f"- A `[{r['rows']}, {r['k']}]` float32 times a random `[{r['k']}, {r['n']}]` weight (std 0.02), "
             f"quantized by `exporters/quantize.py`; {r['threads']} thread(s), prepacking on, {r['repeats']} "
             "interleaved calls each; median (p10-p90) ms",
             "- error: max |Y - A @ W| / max |A @ W| (activation quantization included)", "",
             markdown_table(["variant", "ms", "vs DynamicQuantizeMatMul sym", "error"],
                            [[n, fmt_stats_ms(v["stats"], 2), f"{v['vs_dynamic_sym']:.2f}x", f"{v['max_rel_error']:.4f}"]
                             for n, v in r["variants"].items()]),
             "", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    raise SystemExit(main())
