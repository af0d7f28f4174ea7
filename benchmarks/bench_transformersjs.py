"""transformers.js exports (`pgexport onnx --layout transformers.js`): size and in-Node latency per precision.

    python benchmarks/bench_transformersjs.py                      # the demo model, fp32 fp16 int8 int4
    python benchmarks/bench_transformersjs.py --models demo 3b-2l  # + the 3B geometry, 2 decoder / 2 SigLIP layers

Each model is exported once with every precision side by side, then each precision runs in Node
with `@huggingface/transformers` (tests/js, installed by its test on first use) through `tests/js/generate.mjs`:
its processor, `PaliGemmaForConditionalGeneration` and greedy `generate` on the bundled sample
image and "caption en", `--new-tokens` tokens, one warm-up then `--repeats` timed runs (median).
Reported per precision: the bytes of the three graphs and their data files, the load time, the
generation time (vision, prompt and every new token), the tokens equal to fp32's, and for int4
the folder's size had the embedding table stayed float32 (what the community recipe's q4 keeps).
Writes benchmarks/results/transformersjs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, progress, reduced_config, write_report
from pgexport.bundled import SAMPLE_IMAGE, default_model
from pgexport.eager.loading import load_processor
from pgexport.exporters.transformersjs import DTYPES, SESSIONS, data_file, export_transformersjs, onnx_file
from pgexport.models import PaliGemma, PaliGemmaConfig
from pgexport.processing.processor import PaliGemmaProcessor

JS_DIR = ROOT / "tests" / "js"
QUANTS = ("fp32", "fp16", "int8", "int4")
MODELS = {
    "demo": "the built-in demo model",
    "3b-2l": "paligemma-3b-pt-224 geometry (vocabulary 257216, width 2048, 224 px), 2 decoder and 2 SigLIP layers, random weights",
}


def _model(name: str):
    """(model or checkpoint folder, processor, validate) of a benchmark model."""
    if name == "demo":
        return default_model(), load_processor(str(default_model())), True
    cfg = reduced_config(PaliGemmaConfig.from_preset("paligemma-3b-pt-224"), text_layers=2, vision_layers=2)
    processor = PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size, cfg.num_image_tokens)
    return PaliGemma.random(cfg), processor, False


def _node(folder: Path, dtype: str, new_tokens: int, repeats: int) -> dict:
    args = {"model": str(folder), "dtype": dtype, "images": [str(SAMPLE_IMAGE)], "prompts": ["caption en"],
            "max_new_tokens": new_tokens, "repeats": repeats + 1}
    run = subprocess.run(["node", "generate.mjs", json.dumps(args)], cwd=JS_DIR, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"generate.mjs failed on {folder} ({dtype}):\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_model(name: str, quants: tuple[str, ...], new_tokens: int, repeats: int, work: Path) -> dict:
    model, processor, validate = _model(name)
    out = work / name
    progress(f"{name}: exporting {', '.join(quants)}")
    result = export_transformersjs(model, out, processor, quants=quants, validate=validate, progress=progress)
    del model
    rows = {}
    for quant in quants:
        dtype = DTYPES[quant][0]
        sizes = {s: (out / onnx_file(s, quant)).stat().st_size + (out / data_file(s, quant)).stat().st_size
                 for s in SESSIONS}
        progress(f"{name} {quant}: Node, {repeats} timed generations of {new_tokens} tokens")
        node = _node(out, dtype, new_tokens, repeats)
        timed = node["seconds"][1:]
        rows[quant] = {
            "dtype": dtype,
            "bytes": sum(sizes.values()),
            "bytes_per_graph": sizes,
            "load_s": node["load_seconds"],
            "generate_s": statistics.median(timed),
            "generate_s_all": timed,
            "new_tokens": node["new_tokens"][0],
        }
        if quant in result["reports"]:
            r = result["reports"][quant]
            rows[quant]["validation"] = {"passed": r["passed"], "top1_agreement": r["quality"]["top1_agreement"],
                                         "logits_max_abs_diff": r["logits_max_abs_diff"]}
    ref = rows.get("fp32", {}).get("new_tokens")
    for row in rows.values():
        n = len(row["new_tokens"])
        row["tokens_equal_to_fp32"] = None if ref is None else sum(a == b for a, b in zip(row["new_tokens"], ref)) / max(n, 1)
    if "int4" in rows and "fp32" in rows:
        # The embedding table as float32 (embed_tokens.onnx_data of fp32) in place of the int4 one.
        table32 = (out / data_file("embed_tokens", "fp32")).stat().st_size
        table4 = (out / data_file("embed_tokens", "int4")).stat().st_size
        rows["int4"]["bytes_with_fp32_table"] = rows["int4"]["bytes"] - table4 + table32
    shutil.rmtree(out, ignore_errors=True)
    return {"model": MODELS[name], "new_tokens": new_tokens, "repeats": repeats, "precisions": rows}


def render(result: dict, command: str) -> str:
    mib = 2**20
    lines = ["# transformers.js exports: size and in-Node latency", "", f"`{command}`", "",
             f"- Node {result['node']}, @huggingface/transformers {result['transformersjs']} (onnxruntime-node, CPU); "
             f"{result['machine'].get('cpu_model', '')}, {result['machine'].get('usable_cores')} cores, load average "
             f"{result['machine'].get('load_avg_1_5_15', [0])[0]:.1f} at the end (a shared machine: the times are noisy)",
             "- generate: one `model.generate` call (vision encoder, prompt, every new token; greedy), median of the "
             "timed runs after one warm-up; load: processor + three sessions", ""]
    for name, m in result["models"].items():
        lines += [f"## {name}: {m['model']}", "", f"{m['new_tokens']} new tokens, batch 1, \"caption en\" on the sample image", "",
                  "| precision | transformers.js dtype | size MiB | load s | generate s | generate ms / new tokens | tokens = fp32 "
                  "| validation: top-1 vs eager fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for quant, r in m["precisions"].items():
            eq = "" if r["tokens_equal_to_fp32"] is None else f"{r['tokens_equal_to_fp32']:.0%}"
            top1 = f"{r['validation']['top1_agreement']:.1%}" if "validation" in r else "not run"
            lines.append(f"| {quant} | {r['dtype']} | {r['bytes'] / mib:.1f} | {r['load_s']:.2f} | {r['generate_s']:.3f} | "
                         f"{1000 * r['generate_s'] / m['new_tokens']:.1f} | {eq} | {top1} |")
        if "bytes_with_fp32_table" in m["precisions"].get("int4", {}):
            r = m["precisions"]["int4"]
            lines += ["", f"int4 with a float32 embedding table (the community recipe's q4): "
                          f"{r['bytes_with_fp32_table'] / mib:.1f} MiB, {r['bytes_with_fp32_table'] / r['bytes']:.2f}x "
                          f"the int4 export's {r['bytes'] / mib:.1f} MiB"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["demo"])
    ap.add_argument("--quants", nargs="+", choices=QUANTS, default=list(QUANTS))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transformersjs"))
    args = ap.parse_args(argv)
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        ap.error("tests/js/node_modules is missing: run `npm ci --ignore-scripts` in tests/js first")
    version = json.loads((JS_DIR / "node_modules/@huggingface/transformers/package.json").read_text())["version"]
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    result = {"node": node, "transformersjs": version, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-tjs-") as work:
        for name in args.models:
            result["models"][name] = bench_model(name, tuple(args.quants), args.new_tokens, args.repeats, Path(work))
    return write_report(args.out, result, render, "bench_transformersjs.py", argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
