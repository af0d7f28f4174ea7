"""Would an fp16 KV cache, or ONNX Runtime's GroupQueryAttention, make CPU decode faster at long context?
One layer's attention step, three ways.

    python benchmarks/bench_kv_fp16.py

The decoder graph's attention for one new token over `past` cached positions, as exported
(`q @ k^T`, mask, softmax, `@ v`, the query heads of a KV head folded into the query length),
built with onnx.helper and timed in ONNX Runtime (CPU) three ways, interleaved:

* `fp32 cache`: keys and values stored float32, read by the MatMuls directly;
* `fp16 cache`: stored float16 (half the bytes) and cast to float32 before the MatMuls: ONNX
  Runtime's CPU MatMul has no float16 kernel on x86, so this is what an fp16 cache costs there;
* `GroupQueryAttention`: the contrib op over a float32 cache buffer shared by past and present
  (I/O binding, the new token written in place), with an additive `attention_bias` (what an
  exact prefix-LM / padding mask would need; all zeros here): the fused CPU kernel ONNX Runtime
  offers for this.

Also reported: the largest difference of the attention output between the fp32 and fp16 caches
(the accuracy an fp16 cache would cost, on random keys/values of unit scale); the
GroupQueryAttention output is checked against the fp32 form (to 1e-4) before timing. Writes
benchmarks/results/kv_fp16.json and .md (or --out).
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

from benchmarks.common import fmt_stats_ms, interleaved, machine_markdown, markdown_table, progress, write_report  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kv_fp16"  # .json and .md
MODES = ("fp32 cache", "fp16 cache", "GroupQueryAttention")


def attention_graph(cache_type: int) -> onnx.ModelProto:
    """q [B, Hkv, G, Dh] float32, k/v [B, Hkv, T, Dh] of `cache_type`, mask [B, 1, G, T] bool -> [B, Hkv, G, Dh]."""
    nodes, k, v = [], "k", "v"
    if cache_type != TensorProto.FLOAT:
        nodes += [helper.make_node("Cast", ["k"], ["k32"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["v"], ["v32"], to=TensorProto.FLOAT)]
        k, v = "k32", "v32"
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"]),
              helper.make_node("Where", ["mask", "scores", "lowest"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", v], ["out"])]
    dims = ["B", "H", "T", "D"]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "H", "G", "D"]),
         helper.make_tensor_value_info("k", cache_type, dims), helper.make_tensor_value_info("v", cache_type, dims),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 1, "G", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "H", "G", "D"])],
        [helper.make_tensor("lowest", TensorProto.FLOAT, [], [float(np.finfo(np.float32).min)])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gqa_graph(kv_heads: int, groups: int, head_dim: int) -> onnx.ModelProto:
    """com.microsoft.GroupQueryAttention for one new token: query [B, 1, H*Dh], key/value [B, 1, Hkv*Dh],
    past/present [B, Hkv, M, Dh] (one buffer, M its length), seqlens_k [B] (M - 1), attention_bias
    [B, 1, 1, M] -> out [B, 1, H*Dh]."""
    heads = kv_heads * groups
    vi = helper.make_tensor_value_info
    node = helper.make_node("GroupQueryAttention",
                            ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                             "", "", "", "attention_bias"],
                            ["out", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=kv_heads)
    cache = ["B", kv_heads, "M", head_dim]
    graph = helper.make_graph(
        [node], "gqa",
        [vi("query", TensorProto.FLOAT, ["B", 1, heads * head_dim]), vi("key", TensorProto.FLOAT, ["B", 1, kv_heads * head_dim]),
         vi("value", TensorProto.FLOAT, ["B", 1, kv_heads * head_dim]), vi("past_key", TensorProto.FLOAT, cache),
         vi("past_value", TensorProto.FLOAT, cache), vi("seqlens_k", TensorProto.INT32, ["B"]),
         vi("total_sequence_length", TensorProto.INT32, []), vi("attention_bias", TensorProto.FLOAT, ["B", 1, 1, "M"])],
        [vi("out", TensorProto.FLOAT, ["B", 1, heads * head_dim]), vi("present_key", TensorProto.FLOAT, cache),
         vi("present_value", TensorProto.FLOAT, cache)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def gqa_step(session, q: np.ndarray, k: np.ndarray, v: np.ndarray):
    """(run, output) for GroupQueryAttention over k/v [B, Hkv, T, Dh] as one shared buffer whose last
    position is the new token: bound once, each run writes that token in place and attends to all T."""
    batch, kv_heads, length, head_dim = k.shape
    new = lambda x: np.ascontiguousarray(x[:, :, -1:].transpose(0, 2, 1, 3).reshape(batch, 1, kv_heads * head_dim))
    k_buf, v_buf = ort.OrtValue.ortvalue_from_numpy(k.copy()), ort.OrtValue.ortvalue_from_numpy(v.copy())
    io = session.io_binding()
    io.bind_cpu_input("query", np.ascontiguousarray(q.reshape(batch, 1, -1)))
    io.bind_cpu_input("key", new(k))
    io.bind_cpu_input("value", new(v))
    io.bind_ortvalue_input("past_key", k_buf)
    io.bind_ortvalue_input("past_value", v_buf)
    io.bind_cpu_input("seqlens_k", np.full(batch, length - 1, np.int32))
    io.bind_cpu_input("total_sequence_length", np.array(length, np.int32))
    io.bind_cpu_input("attention_bias", np.zeros((batch, 1, 1, length), np.float32))
    io.bind_output("out")
    io.bind_ortvalue_output("present_key", k_buf)
    io.bind_ortvalue_output("present_value", v_buf)
    session.run_with_iobinding(io)
    return (lambda: session.run_with_iobinding(io)), io.get_outputs()[0].numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--past", default="270,1030,4110", help="cached positions (comma-separated)")
    ap.add_argument("--batch", default="1,4", help="batch sizes (comma-separated)")
    ap.add_argument("--kv-heads", type=int, default=1, help="paligemma-3b: 1 KV head of 256, 8 query heads")
    ap.add_argument("--groups", type=int, default=8, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    so = ort.SessionOptions()
    if args.threads:
        so.intra_op_num_threads = args.threads
    graphs = {"fp32 cache": attention_graph(TensorProto.FLOAT), "fp16 cache": attention_graph(TensorProto.FLOAT16),
              "GroupQueryAttention": gqa_graph(args.kv_heads, args.groups, args.head_dim)}
    sessions = {mode: ort.InferenceSession(graphs[mode].SerializeToString(), so, providers=["CPUExecutionProvider"])
                for mode in MODES}
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for past in (int(p) for p in args.past.split(",")):
            shape = (batch, args.kv_heads, past, args.head_dim)
            k, v = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
            q = rng.standard_normal((batch, args.kv_heads, args.groups, args.head_dim), np.float32)
            qs = q * args.head_dim**-0.5  # the exported form scales q; GroupQueryAttention scales itself
            mask = np.ones((batch, 1, args.groups, past), bool)
            feeds = {"fp32 cache": {"q": qs, "k": k, "v": v, "mask": mask},
                     "fp16 cache": {"q": qs, "k": k.astype(np.float16), "v": v.astype(np.float16), "mask": mask}}
            runs = {mode: (lambda s=sessions[mode], f=feeds[mode]: s.run(None, f)) for mode in feeds}
            outs = {mode: run()[0] for mode, run in runs.items()}
            runs["GroupQueryAttention"], gqa_out = gqa_step(sessions["GroupQueryAttention"], q, k, v)
            np.testing.assert_allclose(gqa_out.reshape(outs["fp32 cache"].shape), outs["fp32 cache"], atol=1e-4)
            progress(f"batch {batch} past {past} ...")
            timed = interleaved(runs, repeats=args.repeats, warmup=3, verbose=False, keep_results=False)
            rows.append({"batch": batch, "past": past, "cache_mb_fp32": 2 * k.nbytes / 1e6,
                         "max_abs_diff": float(np.abs(outs["fp32 cache"] - outs["fp16 cache"]).max()),
                         **{mode: timed[mode].stats for mode in MODES}})
    result = {"kv_heads": args.kv_heads, "groups": args.groups, "head_dim": args.head_dim, "repeats": args.repeats,
              "threads": args.threads, "onnxruntime": ort.__version__, "rows": rows}
    return write_report(args.out, result, markdown, "bench_kv_fp16.py", argv)


def markdown(r: dict, command: str) -> str:
    lines = ["# One layer's attention step on the CPU: fp32 cache, fp16 cache, GroupQueryAttention", "", f"`{command}`", "",
             f"- {r['groups']} query heads over {r['kv_heads']} KV head(s) of {r['head_dim']}, one new token; "
             f"ONNX Runtime {r['onnxruntime']} CPU, {r['repeats']} interleaved runs: median (p10-p90) ms",
             "- fp16 cache: keys and values stored float16 and cast to float32 for the MatMuls (no float16 MatMul "
             "kernel on x86 CPUs); max |diff|: the largest difference of the attention output",
             "- GroupQueryAttention: com.microsoft.GroupQueryAttention over one float32 buffer shared by past and "
             "present (I/O binding), with an additive attention_bias", "",
             markdown_table(["batch", "past", "fp32 cache MB", "fp32 cache ms", "fp16 cache ms", "fp16 / fp32", "max |diff|",
                             "GroupQueryAttention ms", "GQA / fp32"],
                            [[row["batch"], row["past"], f"{row['cache_mb_fp32']:.1f}", fmt_stats_ms(row["fp32 cache"], 3),
                              fmt_stats_ms(row["fp16 cache"], 3),
                              f"{row['fp16 cache'].median / row['fp32 cache'].median:.2f}x", f"{row['max_abs_diff']:.1e}",
                              fmt_stats_ms(row["GroupQueryAttention"], 3),
                              f"{row['GroupQueryAttention'].median / row['fp32 cache'].median:.2f}x"]
                             for row in r["rows"]]), "", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
