"""The `pgexport bench` report: `report.json` (schema below), `report.md`, PNG plots, and `--compare`.

report.json, schema "pgexport-bench/1" (times in seconds, sizes in bytes):

    schema, created (UTC ISO time), machine (pgexport.bench.measure.machine_info: CPU, cores, memory,
        GPUs, library versions, ONNX Runtime providers), settings (model, provider, threads,
        images, new_tokens, repeats, data, inputs), notes [str], plots [file names],
    backends: {name: {
        load_s, import_s                           # one load, seconds (import_s: the libraries, before it)
        vision_s, prefill_s, decode_s              # Stats: n, median, p10, p90, min, max, mean
        tokens_per_s                               # 1 / median decode time (batch 1)
        decode_by_position_ms [new_tokens - 1]     # median per decode step
        rss_after_load_bytes, peak_rss_bytes (load + timed passes), peak_gpu_bytes (PyTorch on CUDA; else null),
        size_bytes,
        accuracy: {top1_agreement, mean_kl, max_kl, mean_cosine, min_cosine, positions,
                   greedy_match_rate}              # vs the fp32 PyTorch reference; absent without one
        task_accuracy: {<task>: score, exact_match, detect_iou, detect_recall, detect_fp_rate,
                        examples, seconds}  # with --data (pgexport.train.dataset.task_metrics)
        accurate: bool, accuracy_issues: [str]    # the gates of ACCURACY_GATES
        info: {...}}},
    recommendation: {backend, reason}

    >>> from pgexport.bench.report import compare_reports
    >>> rows, regressions = compare_reports(json.load(open("old/report.json")), json.load(open("new/report.json")))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from pgexport.bench.measure import jsonable, machine_info, machine_markdown, markdown_table
from pgexport.files import write_text_atomic

SCHEMA = "pgexport-bench/1"
# Accuracy gates against fp32 PyTorch (the project's quantization gates, README "Quantization"):
# teacher-forced top-1 agreement, and task accuracy lost (points of exact match / detection IoU /
# detection recall, or of false-positive rate gained on detect prompts for absent objects).
# int8's top-1 gate is a little below float's: the default DynamicQuantizeMatMul weights have 7
# bits (exporters/quant_numerics.py, DYNAMIC_INT8_MAX), which moves more near-tied tokens (mostly
# <loc> bins next to each other) without costing task accuracy, which keeps float's gate.
ACCURACY_GATES = {
    "float": {"min_top1": 0.99, "max_task_drop": 0.005},
    "int8": {"min_top1": 0.985, "max_task_drop": 0.005},
    "int4": {"min_top1": 0.95, "max_task_drop": 0.02},
}
STATS_FIGURES = ("vision_s", "prefill_s", "decode_s")
TASK_FIGURES = ("exact_match", "detect_iou", "detect_recall", "detect_fp_rate")  # of task_accuracy, in the tables
PLOTS = ("latency.png", "accuracy_vs_size.png", "decode_vs_position.png")


def _gate(name: str) -> dict:
    return ACCURACY_GATES["int4" if name.endswith("int4") else "int8" if name.endswith("int8") else "float"]


def judge(name: str, r: dict, reference: dict | None) -> list[str]:
    """The accuracy gates backend `name` misses (empty: accurate)."""
    issues = []
    acc = r.get("accuracy")
    if not acc:
        return ["no reference to compare with"]
    g = _gate(name)
    if acc["top1_agreement"] < g["min_top1"]:
        issues.append(f"top-1 agreement {acc['top1_agreement']:.4f} < {g['min_top1']}")
    ta, ref_ta = r.get("task_accuracy"), (reference or {}).get("task_accuracy")
    if ta and ref_ta:
        for key in ("exact_match", "detect_iou", "detect_recall"):
            if ta.get(key) is not None and ref_ta.get(key) is not None and ref_ta[key] - ta[key] > g["max_task_drop"]:
                issues.append(f"{key} {ta[key]:.3f} vs {ref_ta[key]:.3f} for fp32 (more than {g['max_task_drop'] * 100:g} points lost)")
        fp, ref_fp = ta.get("detect_fp_rate"), ref_ta.get("detect_fp_rate")
        if fp is not None and ref_fp is not None and fp - ref_fp > g["max_task_drop"]:
            issues.append(f"detect_fp_rate {fp:.3f} vs {ref_fp:.3f} for fp32 (more than {g['max_task_drop'] * 100:g} "
                          "points more boxes for absent objects)")
    return issues


def request_seconds(r: dict, new_tokens: int) -> float:
    """Time for one request of `new_tokens` tokens: prefill (with vision) + the decode steps."""
    return r["prefill_s"]["median"] + (new_tokens - 1) * r["decode_s"]["median"]


def recommend(backends: dict, new_tokens: int) -> dict:
    accurate = {n: r for n, r in backends.items() if r.get("accurate")}
    if not any(r.get("accuracy") for r in backends.values()):
        return {"backend": None, "reason": "no fp32 PyTorch reference to judge accuracy against (pass --reference "
                                           "CHECKPOINT with an export folder)"}
    if not accurate:
        return {"backend": None, "reason": "no backend passed the accuracy gates against fp32 PyTorch"}
    best = min(accurate, key=lambda n: request_seconds(accurate[n], new_tokens))
    r = accurate[best]
    reason = (f"fastest request ({new_tokens} tokens: {request_seconds(r, new_tokens) * 1e3:.1f} ms = prefill "
              f"{r['prefill_s']['median'] * 1e3:.1f} ms + {r['decode_s']['median'] * 1e3:.2f} ms/token) among the "
              f"{len(accurate)} backend(s) within the accuracy gates")
    ref = backends.get("torch")
    if ref and best != "torch":
        reason += (f"; {request_seconds(ref, new_tokens) / request_seconds(r, new_tokens):.2f}x faster than fp32 "
                   f"PyTorch at {r['size_bytes'] / max(ref['size_bytes'], 1):.2f}x its size on disk")
    return {"backend": best, "reason": reason}


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _ms(s: dict | None, digits: int = 1) -> str:
    if not s or s.get("median") is None or (isinstance(s["median"], float) and math.isnan(s["median"])):
        return "n/a"
    return f"{s['median'] * 1e3:.{digits}f} ({s['p10'] * 1e3:.{digits}f}-{s['p90'] * 1e3:.{digits}f})"


def markdown(report: dict) -> str:
    s, rec = report["settings"], report["recommendation"]
    rows = []
    for name, r in report["backends"].items():
        acc, ta = r.get("accuracy") or {}, r.get("task_accuracy") or {}
        rows.append([
            f"**{name}**" if name == rec["backend"] else name,
            _ms(r["vision_s"]), _ms(r["prefill_s"]), _ms(r["decode_s"], 2),
            f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "n/a",
            f"{r['load_s']:.2f}", _mb(r["peak_rss_bytes"]), _mb(r["size_bytes"]),
            f"{acc['top1_agreement']:.3f}" if acc else "n/a", f"{acc['mean_kl']:.2e}" if acc else "n/a",
            f"{acc['greedy_match_rate']:.2f}" if acc else "n/a",
            " / ".join("-" if ta.get(k) is None else f"{ta[k]:.3f}" for k in TASK_FIGURES) if ta else "-",
            "yes" if r.get("accurate") else "NO: " + "; ".join(r.get("accuracy_issues", [])),
        ])
    headers = ["backend", "vision ms", "prefill ms (TTFT)", "decode ms/token", "tokens/s", "load s",
               "peak RSS MiB", "disk MiB", "top-1 vs fp32", "mean KL", "greedy match",
               "exact match / IoU / recall / FP rate", "within gates"]
    if s["provider"] == "cuda":
        headers.insert(7, "peak GPU MiB")
        for row, r in zip(rows, report["backends"].values()):
            row.insert(7, _mb(r.get("peak_gpu_bytes")))
    table = markdown_table(headers, rows)

    lines = [
        f"# pgexport bench: {Path(s['model']).name}",
        "",
        f"**Recommended: {rec['backend'] or 'none'}**: {rec['reason']}.",
        "",
        table,
        "",
        f"Batch 1, provider {s['provider']}, threads {s['threads'] or 'default'}; {s['images']} inputs x "
        f"{s['repeats']} timed passes after a warm-up, {s['new_tokens']} tokens each. Times: median (p10-p90) in ms. "
        "Prefill includes the vision encoder (time to first token). Accuracy: teacher-forced on the fp32 "
        "reference's greedy tokens (top-1 agreement, mean KL of the next-token distributions, greedy match = the "
        "backend's own greedy output equals the reference's). Peak RSS: the backend's own process from start "
        "to the end of the timed passes (Python and libraries included).",
    ]
    if report["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    if report.get("plots"):
        lines += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    lines += ["", "Machine:", "", machine_markdown(report["machine"])]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[str]:
    """Write the PNG plots (matplotlib); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    b = report["backends"]
    x = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, keys, title in ((axes[0], ("vision_s", "prefill_s"), "vision / prefill (ms)"),
                            (axes[1], ("decode_s",), "decode (ms per token)")):
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            med = [b[n][key]["median"] * 1e3 for n in names]
            err = [[max(0.0, (b[n][key]["median"] - b[n][key]["p10"]) * 1e3) for n in names],
                   [max(0.0, (b[n][key]["p90"] - b[n][key]["median"]) * 1e3) for n in names]]
            ax.bar([i + (k - (len(keys) - 1) / 2) * width for i in x], med, width, yerr=err, capsize=3,
                   label=key[:-2])
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("latency per backend (median, p10-p90)")
    fig.tight_layout()
    fig.savefig(out / PLOTS[0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for n in names:
        acc = b[n].get("accuracy")
        if acc:
            ax.scatter(b[n]["size_bytes"] / 2**20, acc["top1_agreement"], s=40)
            ax.annotate(n, (b[n]["size_bytes"] / 2**20, acc["top1_agreement"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("top-1 agreement with fp32")
    ax.set_title("accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for n in names:
        ys = b[n]["decode_by_position_ms"]
        ax.plot(range(1, len(ys) + 1), ys, marker=".", label=n)
    ax.set_xlabel("decode step (tokens after the prompt)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title("decode time against position")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2])
    plt.close(fig)
    return list(PLOTS)


def write_report(out: Path, results: dict, settings: dict, notes: list[str], plots: bool = True,
                 progress: Callable[[str], None] = print, machine: dict | None = None) -> dict:
    """Judge accuracy, pick the recommendation, and write report.json, report.md and the plots."""
    ref = results.get("torch")
    for name, r in results.items():
        r["accuracy_issues"] = [] if (r.get("accuracy") or {}).get("reference") else judge(name, r, ref)
        r["accurate"] = not r["accuracy_issues"]
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine or machine_info(), "settings": settings, "notes": list(notes), "plots": [],
              "backends": results, "recommendation": recommend(results, settings["new_tokens"])}
    if plots:
        try:
            report["plots"] = plot(report, out)
        except ImportError:
            report["notes"].append("plots skipped: matplotlib is not installed (pip install matplotlib)")
    report = jsonable(report)  # NaN / inf -> null: report.json stays valid JSON
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    progress(f"wrote {out / 'report.md'}, {out / 'report.json'}" + (f" and {len(report['plots'])} plots" if report["plots"] else ""))
    return report


# --------------------------------------------------------------------------- compare
def compare_reports(old: dict, new: dict, min_change: float = 0.02) -> tuple[list[list[str]], list[str]]:
    """Change per figure of the backends in both reports, and the regressions.

    A time figure regresses when its median grew by more than the measured spread (the larger
    p90 - p10 of the two runs) and by more than `min_change` (relative); memory and size when they
    grew by more than `min_change`; accuracy when top-1 agreement, exact match, IoU or recall fell,
    or the false-positive rate rose, by more than half a point.
    """
    rows, regressions = [], []
    for name in [n for n in new["backends"] if n in old["backends"]]:
        o, n = old["backends"][name], new["backends"][name]
        for key in STATS_FIGURES:
            a, b = o[key], n[key]
            spread = max(a["p90"] - a["p10"], b["p90"] - b["p10"])
            delta = b["median"] - a["median"]
            bad = delta > spread and delta > min_change * a["median"]
            rows.append([name, key[:-2] + " ms", f"{a['median'] * 1e3:.2f}", f"{b['median'] * 1e3:.2f}",
                         f"{delta / a['median'] * 100:+.1f}%", f"{spread * 1e3:.2f}", "REGRESSION" if bad else ""])
            if bad:
                regressions.append(f"{name} {key[:-2]}: {a['median'] * 1e3:.2f} -> {b['median'] * 1e3:.2f} ms "
                                   f"(+{delta / a['median'] * 100:.1f}%, spread {spread * 1e3:.2f} ms)")
        for key, label in (("load_s", "load s"), ("peak_rss_bytes", "peak RSS bytes"), ("size_bytes", "size bytes")):
            a, b = o.get(key), n.get(key)
            if a and b:
                # one load per run: no spread to judge it by, so load time is shown, never flagged
                bad = key != "load_s" and b > a * (1 + min_change)
                rows.append([name, label, f"{a:.4g}", f"{b:.4g}", f"{(b - a) / a * 100:+.1f}%", "-", "REGRESSION" if bad else ""])
                if bad:
                    regressions.append(f"{name} {label}: {a:.4g} -> {b:.4g} (+{(b - a) / a * 100:.1f}%)")
        acc_pairs = [("top1_agreement", (o.get("accuracy") or {}), (n.get("accuracy") or {}))]
        acc_pairs += [(k, (o.get("task_accuracy") or {}), (n.get("task_accuracy") or {})) for k in TASK_FIGURES]
        for key, a_d, b_d in acc_pairs:
            a, b = a_d.get(key), b_d.get(key)
            if a is not None and b is not None:
                bad = (b - a if key == "detect_fp_rate" else a - b) > 0.005  # the FP rate is better lower
                rows.append([name, key, f"{a:.4f}", f"{b:.4f}", f"{(b - a) * 100:+.2f} pts", "-", "REGRESSION" if bad else ""])
                if bad:
                    regressions.append(f"{name} {key}: {a:.4f} -> {b:.4f}")
    return rows, regressions


def compare_files(old_path: str | os.PathLike, new_path: str | os.PathLike) -> tuple[str, list[str]]:
    """`pgexport bench --compare OLD NEW`: the Markdown table of changes and the regressions."""
    from pgexport.errors import PgExportError

    reports = []
    for p in (old_path, new_path):
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PgExportError(f"cannot read the report {p} ({e.__class__.__name__}); pass two report.json files "
                                "written by `pgexport bench`") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise PgExportError(f"{p} is not a `pgexport bench` report (schema {SCHEMA}); pass its report.json")
        reports.append(d)
    rows, regressions = compare_reports(*reports)
    if not rows:
        raise PgExportError("the two reports share no backend; compare reports of the same backends")
    table = markdown_table(["backend", "figure", "old", "new", "change", "spread", ""], rows)
    old, new = reports
    notes = [f"backend {b} is only in {'the old' if b in old['backends'] else 'the new'} report"
             for b in sorted(set(old["backends"]) ^ set(new["backends"]))]
    for key in ("provider", "threads", "images", "new_tokens", "repeats", "data", "examples"):
        if old["settings"].get(key) != new["settings"].get(key):
            notes.append(f"settings differ: {key} {old['settings'].get(key)!r} -> {new['settings'].get(key)!r}")
    if old["machine"].get("cpu_model") != new["machine"].get("cpu_model"):
        notes.append(f"machines differ: {old['machine'].get('cpu_model')} -> {new['machine'].get('cpu_model')}")
    if notes:
        table += "\n\n" + "\n".join(f"note: {n}" for n in notes)
    return table, regressions
