"""Task accuracy of the int8 / int4 ONNX exports of the demo model against fp32 (CPU).

    python benchmarks/eval_quant_demo.py                       # pgexport/assets/demo, 500 test images
    python benchmarks/eval_quant_demo.py --model DIR --images 40 --out results.json

For each variant (fp32 export, int8 dynamic / MatMulNBits / rowwise, int4 with the defaults and with other
block sizes, symmetry, accuracy level, 8-bit head) on the shapes test set drawn with seed 1234
(its first 100 images are the demo's held-out set, `examples/train_demo.py`; the report gives
the number of exact-match answers, so one flipped answer moves exact match by 100 / answers
points):

* task accuracy with greedy decoding through ONNX Runtime (`OnnxPaliGemma.generate`), scored as
  `pgexport.train.finetune.evaluate` scores the eager model (`pgexport.train.dataset.task_metrics`):
  exact match per question / caption task, mean IoU and recall for `detect` prompts of present
  shapes, and the false-positive rate of `detect` prompts for absent shapes (answers with a box);
* teacher-forced agreement with the eager fp32 model on the gold answers: the prompt, then every
  answer token fed to both (eos included), top-1 agreement of the next-token logits, mean
  KL(fp32 || quantized) and cosine, over all answer positions;
* the export's own validation report (`export_report.json` quality on the bundled sample), bytes.

Writes benchmarks/results/quant_demo.json and .md (or --out) and prints a line per variant.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import quantized_copy, save_results  # noqa: E402
from pgexport.train.evaluate import DEMO_EVAL_IMAGES, DEMO_EVAL_SEED  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant_demo"  # .json and .md


def variants():
    from pgexport.exporters.quantize import QuantOptions

    return {
        "int8": QuantOptions.create("int8"),
        "int8-nbits": QuantOptions.create("int8", int8_format="nbits"),
        "int8-rowwise": QuantOptions.create("int8", int8_format="rowwise"),
        "int4": QuantOptions.create("int4"),
        "int4-acc0": QuantOptions.create("int4", accuracy_level=0),
        "int4-sym": QuantOptions.create("int4", symmetric=True),
        "int4-b64": QuantOptions.create("int4", block_size=64),
        "int4-b32": QuantOptions.create("int4", block_size=32),
        "int4-head8": QuantOptions.create("int4", head_bits=8),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: pgexport/assets/demo)")
    ap.add_argument("--images", type=int, default=DEMO_EVAL_IMAGES,
                    help=f"test images (4-5 examples each; default {DEMO_EVAL_IMAGES}, as the gates of tests/test_demo_quantization.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--batch-sizes", default="64",
                    help="comma-separated batch sizes for the task accuracy (the first fills the main table; dynamic "
                         "int8's activation scales span the whole batch, so its results depend on it)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        ap.error(f"--batch-sizes {args.batch_sizes!r}: give positive integers, e.g. 64,8,1")
    torch.set_num_threads(args.threads)

    import pgexport
    from pgexport.bundled import DEMO_DIR
    from pgexport.exporters.pipeline import export_folder
    from pgexport.exporters.quantize import folder_model_bytes
    from pgexport.train.dataset import read_jsonl, write_dataset

    model_dir = Path(args.model or DEMO_DIR)
    work = Path(tempfile.mkdtemp(prefix="eval-quant-"))
    summary = {"model": str(model_dir), "test_seed": DEMO_EVAL_SEED, "images": args.images, "variants": {}}
    try:
        write_dataset(work / "data", seed=DEMO_EVAL_SEED, train=0, val=0, test=args.images)
        records = read_jsonl(work / "data" / "test.jsonl")
        summary["examples"] = len(records)
        summary["answers"] = sum(r.task != "detect" for r in records)  # exact-match examples
        summary["absent"] = sum(r.task == "detect" and not r.suffix for r in records)  # detect prompts, no such shape
        summary["boxes"] = len(records) - summary["answers"] - summary["absent"]  # detect prompts, shape present
        model = pgexport.load_model(str(model_dir), dtype="float32")
        processor = pgexport.load_processor(str(model_dir))
        reference = eager_reference(model, processor, records, summary)

        base = work / "fp32"
        export_folder(str(model_dir), base, progress=None, validate=False, ort_fusions=False)
        fp32_bytes = folder_model_bytes(base)
        chosen = variants()
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
        for name, options in {"fp32": None, **chosen}.items():
            folder = base if options is None else quantized_copy(base, work / name, options)
            entry = evaluate_variant(folder, model, processor, records, reference, batch_sizes, args.threads)
            entry["size_ratio"] = round(entry["bytes"] / fp32_bytes, 4)
            summary["variants"][name] = entry
            print_variant(name, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_results(args.out, summary, markdown(summary))
    return 0


def eager_reference(model, processor, records, summary: dict) -> list:
    """The eager fp32 model's teacher-forced logits (the reference of every variant); its own
    task accuracy goes into `summary["eager_fp32"]`."""
    from pgexport.eager.generate import EagerStepper
    from pgexport.train.evaluate import teacher_forced_logits
    from pgexport.train.finetune import evaluate

    t = time.time()
    reference = teacher_forced_logits(EagerStepper(model), processor, records, model.cfg.eos_token_id, model.cfg.pad_token_id)
    summary["eager_fp32"] = {"task": evaluate(model, processor, records, batch_size=64, max_new_tokens=40),
                             "seconds": round(time.time() - t, 1)}
    print("eager fp32", summary["eager_fp32"], flush=True)
    return reference


def evaluate_variant(folder: Path, model, processor, records, reference: list, batch_sizes: list[int], threads: int) -> dict:
    """One export: its validation report, teacher-forced agreement with `reference`, and task
    accuracy through ONNX Runtime at each batch size."""
    from pgexport.exporters.quantize import folder_model_bytes
    from pgexport.exporters.validate import logit_quality, validate_export
    from pgexport.runtime import OnnxPaliGemma
    from pgexport.train.evaluate import paired_steps, task_accuracy, teacher_forced_logits

    t = time.time()
    report = validate_export(folder, model, processor, threads=threads, write=False)
    rt = OnnxPaliGemma(folder, threads=threads)
    got = teacher_forced_logits(rt.stepper(), processor, records, model.cfg.eos_token_id, model.cfg.pad_token_id)
    ref_l, got_l, act = paired_steps(reference, got)
    quality = logit_quality(ref_l, got_l, act)
    quality["disagreements"] = disagreements(ref_l, got_l, act, processor)
    by_batch = {b: task_accuracy(rt, records, batch_size=b) for b in batch_sizes}
    rt.close()
    return {"bytes": folder_model_bytes(folder), "size_ratio": None,
            "task": by_batch[batch_sizes[0]], "task_batch_size": batch_sizes[0], "task_by_batch_size": by_batch,
            "teacher_forced": quality,
            "sample_report": {"passed": report["passed"], "failures": report["failures"], "quality": report["quality"]},
            "seconds": round(time.time() - t, 1)}


def print_variant(name: str, entry: dict) -> None:
    task, quality, report = entry["task"], entry["teacher_forced"], entry["sample_report"]
    print(f"{name:11s} ratio {entry['size_ratio']:.3f} exact {task['exact_match']:.4f} iou {task['detect_iou']:.4f} "
          f"recall {task['detect_recall']:.4f} FP rate {task['detect_fp_rate']:.4f} "
          f"| TF top1 {quality['top1_agreement']:.4f} KL {quality['mean_kl']:.2e} cos {quality['mean_cosine']:.5f} "
          f"({quality['positions']} positions) | sample passed {report['passed']} "
          f"top1 {report['quality']['top1_agreement']:.3f} KL {report['quality']['mean_kl']:.2e}", flush=True)


def disagreements(reference, got, active, processor) -> dict:
    """Where fp32 and the variant pick different top-1 tokens: how many, how many of them are two
    `<locNNNN>` tokens (the same box edge, moved), and the median and largest bin distance of
    those (one bin = 1/1024 of the image side)."""
    first_loc = processor.tokenizer.token_to_id("<loc0000>")
    total, distances = 0, []
    for r, g, rows in zip(reference, got, active):  # [B, V] logits per teacher-forced step, active rows
        for a, b in zip(r[rows].argmax(-1).tolist(), g[rows].argmax(-1).tolist()):
            if a != b:
                total += 1
                if first_loc <= min(a, b) and max(a, b) < first_loc + 1024:
                    distances.append(abs(a - b))
    return {"count": total, "loc_tokens": len(distances),
            "loc_bins_median": float(np.median(distances)) if distances else None,
            "loc_bins_max": max(distances) if distances else None}


def fmt(task: dict, key: str) -> str:
    return "-" if task.get(key) is None else f"{task[key]:.4f}"


def markdown(summary: dict) -> str:
    """The Markdown table of `summary`: one row per variant, losses against eager fp32 in points."""
    eager = summary["eager_fp32"]["task"]
    answers = summary.get("answers")
    lines = [f"Demo-model quantization accuracy: {summary['model']}, test seed {summary['test_seed']}, "
             f"{summary['images']} images / {summary.get('examples', '?')} examples ({answers or '?'} exact-match "
             f"answers, {summary.get('boxes', '?')} detect prompts for present shapes, {summary.get('absent', '?')} "
             f"for absent ones). Eager fp32: exact match {eager['exact_match']:.4f}, detection IoU "
             f"{eager['detect_iou']:.4f}, recall {fmt(eager, 'detect_recall')}, false-positive rate "
             f"{fmt(eager, 'detect_fp_rate')}.", "",
             "| variant | size vs fp32 export | exact match | loss (points; net answers) | detection IoU | loss (points) "
             "| recall | FP rate (absent shapes) | TF top-1 | top-1 misses (of which <loc>: median / max bins apart) "
             "| mean KL | cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        t, q = v["task"], v["teacher_forced"]
        d = q["disagreements"]
        lost = eager["exact_match"] - t["exact_match"]
        net = f"; {round(lost * answers):+d}" if answers else ""
        lines.append(f"| {name} | {v['size_ratio']:.3f} | {t['exact_match']:.4f} | {100 * lost:+.2f}{net} | "
                     f"{t['detect_iou']:.4f} | "
                     f"{100 * (eager['detect_iou'] - t['detect_iou']):+.2f} | {fmt(t, 'detect_recall')} | "
                     f"{fmt(t, 'detect_fp_rate')} | {q['top1_agreement']:.4f} | "
                     f"{d['count']} ({d['loc_tokens']}: {d['loc_bins_median']} / {d['loc_bins_max']}) | "
                     f"{q['mean_kl']:.2e} | {q['mean_cosine']:.5f} |")
    by_batch = {n: v["task_by_batch_size"] for n, v in summary["variants"].items() if len(v.get("task_by_batch_size", {})) > 1}
    if by_batch:
        lines += ["", "Loss against eager fp32 (batch 64) by the batch size the export ran at, in points "
                      "(exact match / detection IoU):", "",
                  "| variant | " + " | ".join(f"batch {b}" for b in next(iter(by_batch.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(by_batch.values())))]
        for name, tasks in by_batch.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * (eager['exact_match'] - t['exact_match']):+.2f} / {100 * (eager['detect_iou'] - t['detect_iou']):+.2f}"
                for t in tasks.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
