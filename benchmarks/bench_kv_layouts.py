"""Does another orientation of the attention MatMuls read the KV cache faster on the CPU?

    python benchmarks/bench_kv_layouts.py

One decode step's attention (one new token, 8 query heads over 1 KV head of 256, as in
paligemma-3b) in `--layers` independent copies, so that the cache of all layers is larger than
the CPU's caches at long context and has to come from memory, as in the model. Four forms,
built with onnx.helper, checked against each other and timed interleaved in ONNX Runtime (CPU):

* `q@kT, p@v`: the exported form (the query heads of a KV head are the M = 8 rows of both
  products; MLAS reads keys through a transposed B and packs the values as B);
* `k@qT, p@v`: scores as k @ q^T (the cache is the A operand, streamed row by row; softmax over
  the cache axis);
* `k@qT, vT@pT`: also the values stored transposed, [B, Hkv, Dh, T], so both products stream the
  cache as A (this would change the cache layout the graphs exchange);
* `q@kT, vT@pT`: only the values transposed.

The growth of the step time from `--short` to `--long` cached positions is reported in units of
the time to read the long cache once at the read bandwidth measured in the same run, the unit of
docs/performance.md's KV-cache section. Writes benchmarks/results/kv_layouts.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from benchmarks.bench_decode_roofline import read_bandwidth  # noqa: E402
from benchmarks.common import fmt_stats_ms, interleaved, machine_markdown, markdown_table, progress, write_report  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kv_layouts"  # .json and .md
FORMS = ("q@kT, p@v", "k@qT, p@v", "k@qT, vT@pT", "q@kT, vT@pT")


def layers_graph(form: str, layers: int, groups: int, head_dim: int) -> onnx.ModelProto:
    """q [B, 1, G, Dh]; per layer l: k{l} [B, 1, T, Dh], v{l} [B, 1, T, Dh] (or [B, 1, Dh, T] for the
    vT forms) -> out [B, 1, G, Dh], the sum of the layers' attention outputs."""
    scores_kq, values_t = form.startswith("k@qT"), form.endswith("vT@pT")
    vi = helper.make_tensor_value_info
    inputs = [vi("q", TensorProto.FLOAT, ["B", 1, groups, head_dim])]
    nodes, outs = [], []
    t = lambda x, y: helper.make_node("Transpose", [x], [y], perm=[0, 1, 3, 2])
    mm = lambda a, b, y: helper.make_node("MatMul", [a, b], [y])
    if scores_kq:
        nodes.append(t("q", "qT"))  # [B, 1, Dh, G]
    for n in range(layers):
        k, v, s, p, o = f"k{n}", f"v{n}", f"s{n}", f"p{n}", f"o{n}"
        inputs += [vi(k, TensorProto.FLOAT, ["B", 1, "T", head_dim]),
                   vi(v, TensorProto.FLOAT, ["B", 1, head_dim, "T"] if values_t else ["B", 1, "T", head_dim])]
        if scores_kq:  # scores [B, 1, T, G], softmax over T
            nodes += [mm(k, "qT", s), helper.make_node("Softmax", [s], [p], axis=-2)]
            nodes += [mm(v, p, o + "T"), t(o + "T", o)] if values_t else [t(p, p + "T"), mm(p + "T", v, o)]
        else:  # scores [B, 1, G, T]
            nodes += [t(k, k + "T"), mm("q", k + "T", s), helper.make_node("Softmax", [s], [p], axis=-1)]
            nodes += [t(p, p + "T"), mm(v, p + "T", o + "T"), t(o + "T", o)] if values_t else [mm(p, v, o)]
        outs.append(o)
    nodes.append(helper.make_node("Sum", outs, ["out"]))
    graph = helper.make_graph(nodes, "attention_layers", inputs, [vi("out", TensorProto.FLOAT, ["B", 1, groups, head_dim])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=270, help="cached positions at the 224 geometry")
    ap.add_argument("--long", type=int, default=4110, help="cached positions at the 896 geometry")
    ap.add_argument("--batch", default="1,4", help="batch sizes (comma-separated)")
    ap.add_argument("--layers", type=int, default=18, help="copies of the attention (paligemma-3b: 18 layers)")
    ap.add_argument("--groups", type=int, default=8, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    so = ort.SessionOptions()
    if args.threads:
        so.intra_op_num_threads = args.threads
    sessions = {f: ort.InferenceSession(layers_graph(f, args.layers, args.groups, args.head_dim).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"]) for f in FORMS}
    progress(f"read bandwidth over {args.bandwidth_gib} GiB ...")
    bandwidth = read_bandwidth(args.bandwidth_gib)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        ms = {}
        for past in (args.short, args.long):
            q = rng.standard_normal((batch, 1, args.groups, args.head_dim), np.float32) * args.head_dim**-0.5
            shape = (batch, 1, past, args.head_dim)
            ks = [rng.standard_normal(shape, np.float32) for _ in range(args.layers)]
            vs = [rng.standard_normal(shape, np.float32) for _ in range(args.layers)]
            vts = [np.ascontiguousarray(v.transpose(0, 1, 3, 2)) for v in vs]
            feeds = {f: {"q": q, **{f"k{n}": ks[n] for n in range(args.layers)},
                         **{f"v{n}": (vts if f.endswith("vT@pT") else vs)[n] for n in range(args.layers)}} for f in FORMS}
            first = sessions[FORMS[0]].run(None, feeds[FORMS[0]])[0]
            for f in FORMS[1:]:
                np.testing.assert_allclose(sessions[f].run(None, feeds[f])[0], first, rtol=1e-4, atol=1e-4)
            progress(f"batch {batch} past {past} ...")
            runs = {f: (lambda s=sessions[f], fd=feeds[f]: s.run(None, fd)) for f in FORMS}
            timed = interleaved(runs, repeats=args.repeats, warmup=3, verbose=False, keep_results=False)
            ms[past] = {f: timed[f].stats for f in FORMS}
            del ks, vs, vts, feeds
        cache_bytes = 2 * args.layers * batch * args.long * args.head_dim * 4
        read_ms = cache_bytes / bandwidth * 1e3
        rows.append({"batch": batch, "cache_mb": cache_bytes / 1e6, "read_ms": read_ms,
                     **{f: {"short": ms[args.short][f], "long": ms[args.long][f],
                            "growth_reads": (ms[args.long][f].median - ms[args.short][f].median) * 1e3 / read_ms}
                        for f in FORMS}})
    result = {"short": args.short, "long": args.long, "layers": args.layers, "groups": args.groups,
              "head_dim": args.head_dim, "repeats": args.repeats, "threads": args.threads,
              "read_bandwidth_gbs": bandwidth / 1e9, "onnxruntime": ort.__version__, "rows": rows}
    return write_report(args.out, result, markdown, "bench_kv_layouts.py", argv)


def markdown(r: dict, command: str) -> str:
    lines = ["# Attention MatMul orientations against the KV cache on the CPU", "", f"`{command}`", "",
             f"- {r['layers']} copies of one decode step's attention: {r['groups']} query heads over 1 KV head of "
             f"{r['head_dim']}; ONNX Runtime {r['onnxruntime']} CPU, {r['repeats']} interleaved runs: median (p10-p90) ms",
             f"- growth: (ms at past {r['long']} - ms at past {r['short']}) / the time to read the past-{r['long']} cache "
             f"of all copies once at the read bandwidth measured in this run, **{r['read_bandwidth_gbs']:.1f} GB/s**", ""]
    head = ["batch", "form", f"past {r['short']} ms", f"past {r['long']} ms", "growth (cache reads)"]
    body = []
    for row in r["rows"]:
        for f in FORMS:
            body.append([row["batch"], f, fmt_stats_ms(row[f]["short"], 2), fmt_stats_ms(row[f]["long"], 2),
                         f"{row[f]['growth_reads']:.2f}"])
    lines += [markdown_table(head, body), "",
              "Cache size and one read: " + "; ".join(f"batch {row['batch']}: {row['cache_mb']:.0f} MB, "
                                                       f"{row['read_ms']:.1f} ms" for row in r["rows"]), "",
              machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
