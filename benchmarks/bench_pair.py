"""ONNX export folders side by side in one process: vision encoder, prefill, decode, interleaved.

    python benchmarks/bench_pair.py --threads 1 --passes 15 \\
        /tmp/pgexport-bench-quant/onnx-int8-L6 /tmp/pgexport-bench-quant/quantize-dynamic-int8-L6

`bench_quant_baselines.py` measures each backend in a process of its own, one after the other
(clean load times and peak RSS), so a ratio between two backends there also carries whatever the
shared machine did between their runs. Here every folder is loaded in one process
(`pgexport.runtime.OnnxPaliGemma`, CPU) and the passes alternate: pass r starts with folder
r mod n. A pass is, on batch 1 (`benchmarks.common.scene_input`: one synthetic scene and its
caption prompt, as bench_quant_baselines): the vision encoder alone; prefill (vision included, to
the first token's logits); then --new-tokens - 1 greedy decode steps. Each pass gives a ratio of
the first folder's time to each other folder's, and the report gives the median and p10-p90 of
those paired ratios next to the medians. Writes benchmarks/results/pair.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Stats, export_folders, fmt_stats_ms, interleaved, machine_markdown, markdown_table, processed, progress,
    scene_input, write_report,
)

RESULTS = Path(__file__).parent / "results" / "pair"  # .json and .md
PARTS = ("vision", "prefill", "decode")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="export folders (the first is compared with each other one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=15, help="timed passes per folder, after one warm-up pass each")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens per pass: the first from prefill, the others decoded")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.passes < 1 or args.new_tokens < 2:
        ap.error("--passes must be >= 1 and --new-tokens >= 2 (one prefill token, then decode steps)")
    folders = export_folders(ap, args.folders, "pgexport.json")

    from pgexport.bench.worker import timed_pass
    from pgexport.runtime import OnnxPaliGemma

    names = [f.name for f in folders]
    runtimes = {}
    for f in folders:
        progress(f"loading {f} ...")
        runtimes[f.name] = OnnxPaliGemma(f, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        x = scene_input(Path(tmp))
        batch = processed(folders[0], x)
    prompt_tokens = int(batch["input_ids"].shape[1])

    def one_pass(rt) -> dict[str, float]:  # greedy; the logits are dropped, only the times kept
        vision, prefill, steps, _ = timed_pass(rt.encode_image, rt.stepper, batch, args.new_tokens)
        return {"vision": vision, "prefill": prefill, "decode": float(np.median(steps))}

    progress(f"{args.passes} passes after a warm-up, interleaved ...")
    timed = interleaved({n: (lambda rt=rt: one_pass(rt)) for n, rt in runtimes.items()}, repeats=args.passes,
                        warmup=1, verbose=False)
    times = {n: [run.result for run in m.runs] for n, m in timed.items()}
    for rt in runtimes.values():
        rt.close()

    result = {"threads": args.threads, "passes": args.passes, "new_tokens": args.new_tokens,
              "prompt_tokens": prompt_tokens, "prompt": x["prompt"], "folders": {}, "ratios": {}}
    for n, f in zip(names, folders):
        result["folders"][n] = {"path": str(f), **{p: Stats.of(t[p] for t in times[n]) for p in PARTS}}
    first = names[0]
    for other in names[1:]:
        result["ratios"][f"{first} / {other}"] = {
            p: Stats.of(a[p] / b[p] for a, b in zip(times[first], times[other])) for p in PARTS}
    return write_report(args.out, result, markdown, "bench_pair.py", argv)


def markdown(r: dict, command: str) -> str:
    lines = ["# Export folders side by side (one process, interleaved passes)", "", f"`{command}`", "",
             f"- batch 1, one synthetic scene + \"{r['prompt']}\" = {r['prompt_tokens']} prompt tokens; "
             f"{r['new_tokens']} tokens per pass (1 from prefill, {r['new_tokens'] - 1} decode steps, greedy); "
             f"{r['passes']} timed passes per folder after one warm-up; {r['threads']} thread(s); CPU",
             "- prefill includes the vision encoder; decode is each pass's median step; medians (p10-p90) in ms", "",
             markdown_table(["folder", "vision ms", "prefill ms", "decode ms/token"],
                            [[n, fmt_stats_ms(f["vision"]), fmt_stats_ms(f["prefill"]), fmt_stats_ms(f["decode"], 2)]
                             for n, f in r["folders"].items()])]
    if r["ratios"]:
        lines += ["", "Paired ratios (per pass, then the median and p10-p90 over passes):", "",
                  markdown_table(["ratio", "vision", "prefill", "decode"],
                                 [[k] + [f"{v[p].median:.3f} ({v[p].p10:.3f}-{v[p].p90:.3f})" for p in PARTS]
                                  for k, v in r["ratios"].items()])]
    lines += ["", machine_markdown(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
