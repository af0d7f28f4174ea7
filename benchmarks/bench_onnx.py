"""ONNX Runtime fp32 against our eager PyTorch and transformers eager, same weights, one run.

At the geometry of a preset (default `paligemma-3b-pt-224`, full depth: 27 vision and 18 decoder
layers) with random weights (`pgexport init`'s checkpoint, reused when it exists), this measures

1. export: `exporters.pipeline.export_folder(checkpoint, validate=False)` in a fresh process
   (weights streamed from the checkpoint): wall time, peak RSS, files on disk;
2. ONNX Runtime fp32 through `pgexport.runtime.OnnxPaliGemma` (the shipped runtime, its default
   `share_weights=True`: the decoder data memory-mapped once for prefill and decode, prepacking
   off), in a fresh process: session load time, RSS, vision encoder, prefill (time to the first
   token's logits: vision + decoder prefill, as `bench_eager.py` measures it) and per-token
   decode, greedy; with `--prepack on|both` (default both), also ONNX Runtime's default loading
   (each session copies and prepacks its weights, what `share_weights=False` does) in a minimal
   session loop that holds one session at a time (vision, then prefill, then decode from the
   prefill's cache), because two prepacked copies of a large decoder may not fit in memory;
3. our eager model (`pgexport.load_model`, weights memory-mapped from the checkpoint) and
   transformers' `PaliGemmaForConditionalGeneration` (sdpa attention) holding the *same* tensors
   (assigned, not copied), in one fresh process, interleaved exactly as `bench_eager.py` does.

Why separate processes: three fp32 copies of a 3B model need not fit in memory, and an ONNX
Runtime session cannot read PyTorch's `[out, in]` weights (the export stores `[in, out]`), so the
ORT process and the eager process run one after the other, each holding one copy. To keep the
comparison honest on a shared machine, the two processes alternate over `--rounds` rounds (ORT
then eager, then eager then ORT, ...), every sample of every round is pooled, the load average is
recorded around every process, and ratios are reported both from the pooled medians and per
round. Ours vs transformers is interleaved step by step inside the eager process.

Agreement: the first-token logits and the greedy tokens of ORT and of our eager model are saved
and compared (they must agree: same weights, same inputs).

    python benchmarks/bench_onnx.py --rounds 2 --repeats 3 --new-tokens 16

Writes `benchmarks/results/onnx_fp32.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import set_omp_wait_policy  # noqa: E402

if __name__ == "__main__":  # before torch loads its OpenMP runtime (children inherit the environment)
    set_omp_wait_policy(sys.argv[1:])

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ROOT, HFRunner, OrtRunner, OursRunner, Stats, command_line, current_rss_bytes, emit, fmt_stats_ms,
    generation_runs, gib, init_command, machine_info, machine_markdown, markdown_table, meminfo_bytes, ort_session,
    peak_rss_bytes, progress, random_inputs, ratio, reduce_depth, reset_peak_rss, run_child, runner_samples,
    save_results, transformers_sharing, usable_cores,
)

ORT, ORT_PREPACK, OURS, HF = "ort", "ort_prepack", "ours", "transformers"
LABELS = {ORT: "ORT fp32 (runtime, share_weights: no prepack)", ORT_PREPACK: "ORT fp32 prepacked (one session at a time)",
          OURS: "ours eager", HF: "transformers eager"}
STAGES = (("vision", "vision encoder"), ("prefill", "prefill (to first logits)"), ("decode", "decode, per token"))
TARGETS = {"vision": 0.7, "prefill": 0.8, "decode": 0.8}


def inputs(cfg, args):
    """The benchmark's prompt and image (numpy), the same in every process."""
    return random_inputs(cfg, args.prompt_tokens, args.seed + 1)


# --------------------------------------------------------------------------- children
def child_export(args) -> None:
    from pgexport.exporters.pipeline import export_folder

    reset_peak_rss()
    base = current_rss_bytes()
    t = time.perf_counter()
    res = export_folder(args.checkpoint, args.onnx_dir, quant="fp32", validate=False, overwrite=True, progress=progress)
    emit({"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes(), "rss_before": base,
          "files": res["files"], "total_bytes": res["total_bytes"], "export": res["export"]})


def child_ort(args) -> None:
    """The runtime (share_weights, or not for the `ort_prepack` variant's sessions): warm-up
    passes, then `repeats` timed passes (vision, prefill, greedy decode steps)."""
    if args.variant == ORT_PREPACK:
        return child_ort_prepacked(args)
    from pgexport.bench.worker import timed_pass
    from pgexport.models.config import PaliGemmaConfig
    from pgexport.runtime import OnnxPaliGemma

    cfg = PaliGemmaConfig.from_json_file(Path(args.onnx_dir) / "config.json")
    ids, mask, px = inputs(cfg, args)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
    share = args.variant == ORT
    base = current_rss_bytes()
    t = time.perf_counter()
    model = OnnxPaliGemma(args.onnx_dir, threads=args.threads, share_weights=share)
    load_s = time.perf_counter() - t
    rss_load = current_rss_bytes()

    def one_pass(new_tokens: int):  # prefill gives the first token, then `new_tokens` decode steps
        v, p, steps, logits = timed_pass(model.encode_image, model.stepper, batch, new_tokens + 1)
        return v, p, steps, [int(x.argmax()) for x in logits]

    for _ in range(args.warmup):
        v, p, st, _ = one_pass(min(args.new_tokens, 4))
        progress(f"[{args.variant}] warm-up vision {v:.2f}s, prefill {p:.2f}s decode {statistics.median(st) * 1e3:.0f} ms/token")
    vision, prefill, steps, tokens = [], [], [], []
    for r in range(args.repeats):
        v, p, st, toks = one_pass(args.new_tokens)
        vision.append(v)
        prefill.append(p)
        steps.append(st)
        tokens.append(toks)
        progress(f"[{args.variant}] repeat {r + 1}/{args.repeats}: vision {v:.2f}s, prefill {p:.2f}s, "
                 f"decode {statistics.median(st) * 1e3:.0f} ms/token")
    np.save(Path(args.workdir) / f"logits_{args.variant}.npy", model.stepper().prefill(ids, mask, px, 1))
    emit({"load_s": load_s, "rss_before": base, "rss_after_load": rss_load, "rss_after_run": current_rss_bytes(),
          "peak_rss": peak_rss_bytes(), "vision_s": vision, "prefill_s": prefill, "step_s": steps, "tokens": tokens,
          "threads": args.threads, "share_weights": share})


def child_ort_prepacked(args) -> None:
    """ORT with prepacking (each session copies and prepacks its weights), one session at a time.

    Prefill and decode sessions that each hold a prepacked copy of the decoder weights may not
    fit in memory together, so each stage runs with only its own session loaded: vision, then
    prefill (its KV cache kept), then decode from that cache. The per-stage speed is what
    `share_weights=False` gives; its memory is reported per session.
    """
    from pgexport.models.config import PaliGemmaConfig

    folder = Path(args.onnx_dir)
    cfg = PaliGemmaConfig.from_json_file(folder / "config.json")
    ids, mask, px = inputs(cfg, args)
    base = current_rss_bytes()
    out = {"load_s": 0.0, "rss_before": base, "rss_per_session": {}, "threads": args.threads, "share_weights": False}

    def session(graph: str, stage: str):
        t0 = time.perf_counter()
        s = ort_session(folder / graph, args.threads, quiet=True)
        out["load_s"] += time.perf_counter() - t0
        out["rss_per_session"][stage] = current_rss_bytes() - base
        return s

    def passes(fn, *fn_args):  # (seconds of each timed call, after the warm-up calls; the last call's result)
        seconds, value = [], None
        for r in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            value = fn(*fn_args)
            if r >= args.warmup:
                seconds.append(time.perf_counter() - t0)
        return seconds, value

    vis_s = session("vision_encoder.onnx", "vision_encoder")
    vision, (feats,) = passes(vis_s.run, None, {"pixel_values": px})
    del vis_s
    pre_s = session("prefill.onnx", "prefill")
    feed = {"input_ids": ids, "image_features": feats, "attention_mask": mask}
    prefill, res = passes(pre_s.run, None, feed)
    prefill = [p + statistics.median(vision) for p in prefill]  # + vision: time to the first logits
    np.save(Path(args.workdir) / f"logits_{args.variant}.npy", res[0])
    first_token, past0 = int(res[0][0].argmax()), res[1:]
    del pre_s, res
    dec_s = session("decode.onnx", "decode")
    steps, tokens = prepacked_decode(args, dec_s, cfg, mask, first_token, past0)
    out.update({"rss_after_load": base + max(out["rss_per_session"].values()), "rss_after_run": current_rss_bytes(),
                "peak_rss": peak_rss_bytes(), "vision_s": vision, "prefill_s": prefill, "step_s": steps, "tokens": tokens})
    emit(out)


def prepacked_decode(args, dec_s, cfg, mask, first_token: int, past0) -> tuple[list, list]:
    """Greedy decode steps from the prefill's cache with the decode session alone: (seconds per
    step, tokens) of each timed repeat; the warm-up repeats take 4 steps at most."""
    past_names = [f"past_key_values.{i}.{kv}" for i in range(cfg.text.num_hidden_layers) for kv in ("key", "value")]
    steps, tokens = [], []
    for r in range(args.warmup + args.repeats):
        past, m, toks, st = past0, mask, [first_token], []
        for _ in range(args.new_tokens if r >= args.warmup else min(args.new_tokens, 4)):
            m = np.concatenate([m, np.ones((1, 1), np.int64)], axis=1)
            feed = {"input_ids": np.array([[toks[-1]]], np.int64), "attention_mask": m, **dict(zip(past_names, past))}
            t0 = time.perf_counter()
            o = dec_s.run(None, feed)
            st.append(time.perf_counter() - t0)
            past = o[1:]
            toks.append(int(o[0][0].argmax()))
        if r >= args.warmup:
            steps.append(st)
            tokens.append(toks)
            progress(f"[{args.variant}] repeat {r + 1 - args.warmup}/{args.repeats}: decode {statistics.median(st) * 1e3:.0f} ms/token")
    return steps, tokens


def child_eager(args) -> None:
    """Ours (memory-mapped from the checkpoint) and transformers sharing its tensors, interleaved."""
    import torch

    import pgexport

    torch.set_num_threads(args.threads)
    ours = pgexport.load_model(args.checkpoint, dtype="float32").eval()
    hf = transformers_sharing(ours, args.hf_attn)
    ids, mask, px = inputs(ours.cfg, args)
    runners = {OURS: OursRunner(ours, ids, mask, px), HF: HFRunner(hf, ids, mask, px)}
    rss_load = current_rss_bytes()
    with torch.inference_mode():
        vis, gen = generation_runs(runners, args.repeats, args.warmup, args.new_tokens, warmup_tokens=4,
                                   first=args.round, label="eager")
        runners[OURS].prefill(1)
        np.save(Path(args.workdir) / "logits_ours.npy", runners[OURS].logits)
        runners[HF].prefill(1)
        np.save(Path(args.workdir) / "logits_transformers.npy", runners[HF].logits.float().numpy())
    out = {"rss_after_load": rss_load, "peak_rss": peak_rss_bytes(), "threads": args.threads}
    for n in runners:
        out[n] = runner_samples(vis, gen, n)
    emit(out)


def _no_spinning_sessions() -> None:
    """ONNX Runtime sessions created from now on in this process do not spin-wait between ops (its
    idle workers would otherwise take the cores PyTorch's next call needs, as OMP_WAIT_POLICY=
    PASSIVE prevents for PyTorch)."""
    import onnxruntime as ort

    original = ort.SessionOptions

    def options():
        so = original()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    ort.SessionOptions = options


def child_export_reduced(args) -> None:
    import pgexport
    from pgexport.exporters.pipeline import export_folder

    small = reduce_depth(pgexport.load_model(args.checkpoint, dtype="float32"), args.interleaved_text_layers)
    t = time.perf_counter()
    res = export_folder(small, args.reduced_dir, quant="fp32", validate=False, overwrite=True, progress=progress)
    emit({"seconds": time.perf_counter() - t, "files": res["files"]})


def child_interleaved(args) -> None:
    """ORT (the runtime, share_weights), ours and transformers in one process at reduced decoder
    depth, interleaved stage by stage and decode step by step."""
    import torch

    import pgexport

    torch.set_num_threads(args.threads)
    _no_spinning_sessions()
    from pgexport.runtime import OnnxPaliGemma

    ours = reduce_depth(pgexport.load_model(args.checkpoint, dtype="float32"), args.interleaved_text_layers)
    hf = transformers_sharing(ours, args.hf_attn)
    ort_model = OnnxPaliGemma(args.reduced_dir, threads=args.threads, share_weights=True)
    ids, mask, px = inputs(ours.cfg, args)
    runners = {ORT: OrtRunner(ort_model, ids, mask, px), OURS: OursRunner(ours, ids, mask, px), HF: HFRunner(hf, ids, mask, px)}
    with torch.inference_mode():
        vis, gen = generation_runs(runners, args.repeats * args.rounds, args.warmup, args.new_tokens, warmup_tokens=4,
                                   label="interleaved")
    out = {"rss_after_run": current_rss_bytes(), "peak_rss": peak_rss_bytes(), "text_layers": args.interleaved_text_layers}
    for n in runners:
        out[n] = runner_samples(vis, gen, n, cpu=True)
    emit(out)


CHILDREN = {"export": child_export, "ort": child_ort, "eager": child_eager, "export-reduced": child_export_reduced,
            "interleaved": child_interleaved}


# --------------------------------------------------------------------------- parent
def child(kind: str, args, extra: list[str] | None = None) -> dict:
    """Run this script as `--child KIND` in a fresh process; its result, wall time and load average."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--checkpoint", str(args.checkpoint),
           "--onnx-dir", str(args.onnx_dir), "--workdir", str(args.workdir), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--seed", str(args.seed), "--hf-attn", args.hf_attn,
           *(extra or [])]
    c = run_child(cmd)
    if not c.ok:
        raise SystemExit(f"child {kind} failed ({c.failure(1)})")
    return {**c.result, "wall_s": c.wall_s, "load_avg_before": c.load_avg_before, "load_avg_after": c.load_avg_after}


def ensure_checkpoint(args) -> dict | None:
    if (Path(args.checkpoint) / "config.json").is_file():
        return None
    progress(f"writing {args.checkpoint} (random weights, pgexport init)")
    c = run_child(init_command(args.preset, args.checkpoint))
    if c.code != 0:
        raise SystemExit(f"pgexport init failed ({c.failure(1)})")
    return {"seconds": c.wall_s}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--workdir", default="/tmp/pgexport-bench-load", help="checkpoint and export folder live here")
    ap.add_argument("--checkpoint", default=None, help="default: WORKDIR/PRESET-float32 (written by pgexport init if missing)")
    ap.add_argument("--onnx-dir", default=None, help="default: WORKDIR/PRESET-onnx-fp32 (re-exported each run)")
    ap.add_argument("--reuse-export", action="store_true", help="skip the export when ONNX_DIR holds one (no export numbers)")
    ap.add_argument("--rounds", type=int, default=2, help="ORT / eager process pairs, order alternating")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=10, help="text tokens after the image tokens")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--prepack", default="both", choices=["off", "on", "both"],
                    help="ORT variants: share_weights (prepack off), prepack on, or both (prepack on only if it fits in memory)")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--omp-wait-policy", default=None, choices=["passive", "active", "default"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_fp32"))
    ap.add_argument("--interleaved-text-layers", type=int, default=6,
                    help="decoder layers of the one-process interleaved comparison (0: skip it)")
    ap.add_argument("--reduced-dir", default=None, help="default: WORKDIR/PRESET-L{N}-onnx-fp32")
    ap.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=ORT, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.checkpoint = args.checkpoint or str(Path(args.workdir) / f"{args.preset}-float32")
    args.onnx_dir = args.onnx_dir or str(Path(args.workdir) / f"{args.preset}-onnx-fp32")
    args.reduced_dir = args.reduced_dir or str(Path(args.workdir) / f"{args.preset}-L{args.interleaved_text_layers}-onnx-fp32")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        CHILDREN[args.child](args)
        return 0

    info = machine_info(["onnxscript", "onnx_ir"])
    progress(f"machine: {info['cpu_model']}, {info['usable_cores']} cores, {info['mem_available_gib']} GiB available")
    init = ensure_checkpoint(args)
    for stale in Path(args.workdir).glob("logits_*.npy"):  # written by this run's children
        stale.unlink()
    results: dict[str, Any] = {"benchmark": "onnx_fp32", "machine": info, "init": init}

    from pgexport.models.checkpoint import read_config
    from pgexport.models.config import PaliGemmaConfig

    cfg = read_config(args.checkpoint)
    preset_cfg = PaliGemmaConfig.from_preset(args.preset)
    ids, _, _ = inputs(cfg, args)
    export = export_once(args)
    files = {p.name: p.stat().st_size for p in sorted(Path(args.onnx_dir).iterdir()) if p.is_file()}
    samples, procs, skipped = full_depth_rounds(args, files)
    inter = interleaved_comparison(args) if args.interleaved_text_layers > 0 else None
    results.update({
        "setup": setup(args, cfg, preset_cfg, int(ids.shape[1])),
        "export": export,
        "disk": {"files": files, "total_bytes": sum(files.values()),
                 "weight_bytes": sum(v for k, v in files.items() if k.endswith(".data")),
                 "checkpoint_bytes": sum(p.stat().st_size for p in Path(args.checkpoint).glob("*.safetensors"))},
        "processes": procs,
        "skipped": skipped,
        **summarize(samples),
        "agreement": agreement(samples, Path(args.workdir)),
        "samples": samples,
        "interleaved": inter,
    })
    save_results(args.out, results, render_markdown(results), echo=True)
    return 0


def export_once(args) -> dict | None:
    """The full-depth fp32 export in a fresh process (None when --reuse-export finds one)."""
    if args.reuse_export and (Path(args.onnx_dir) / "pgexport.json").is_file():
        progress(f"reusing the export in {args.onnx_dir}")
        return None
    progress(f"exporting {args.checkpoint} -> {args.onnx_dir} (fresh process)")
    export = child("export", args)
    progress(f"export: {export['seconds']:.0f}s, peak RSS {gib(export['peak_rss']):.2f} GiB")
    return export


def full_depth_rounds(args, files: dict[str, int]) -> tuple[dict, list[dict], dict]:
    """`--rounds` rounds of an ORT process per variant and an eager process (ours + transformers),
    their order alternating: (pooled samples per candidate, the processes, skipped variants)."""
    variants = [ORT] if args.prepack == "off" else [ORT_PREPACK] if args.prepack == "on" else [ORT, ORT_PREPACK]
    skipped = {}
    samples: dict[str, dict[str, list]] = {k: {"vision_s": [], "prefill_s": [], "step_s": [], "rounds": []} for k in [*variants, OURS, HF]}
    procs: list[dict] = []
    keys = ("vision_s", "prefill_s", "step_s")
    for rnd in range(args.rounds):
        for kind in (["ort", "eager"] if rnd % 2 == 0 else ["eager", "ort"]):
            if kind == "eager":
                progress(f"round {rnd + 1}/{args.rounds}: eager (ours + transformers, shared weights)")
                r = child("eager", args, ["--round", str(rnd)])
                procs.append({"kind": "eager", "round": rnd, **{k: v for k, v in r.items() if k not in (OURS, HF)}})
                for n in (OURS, HF):
                    for key in keys:
                        samples[n][key] += r[n][key]
                    samples[n]["rounds"].append(r[n])
                continue
            for variant in variants:
                if variant == ORT_PREPACK:  # one session at a time, each with its own prepacked copy of its weights
                    need, free = files.get("decoder.onnx.data", 0), gib(meminfo_bytes("MemAvailable"))
                    if gib(need) + 1.0 > free:
                        skipped[variant] = f"needs ~{gib(need):.1f} GiB for one prepacked session, {free:.1f} GiB available"
                        progress(f"round {rnd + 1}: skipping {variant}: {skipped[variant]}")
                        continue
                progress(f"round {rnd + 1}/{args.rounds}: {LABELS[variant]}")
                r = child("ort", args, ["--variant", variant, "--round", str(rnd)])
                procs.append({"kind": variant, "round": rnd, **{k: v for k, v in r.items() if k not in (*keys, "tokens")}})
                for key in keys:
                    samples[variant][key] += r[key]
                samples[variant]["rounds"].append({k: r[k] for k in (*keys, "tokens")})
    return samples, procs, skipped


def _total(samples: list) -> float:
    """The sum of per-repeat seconds, or of per-repeat lists of seconds (decode steps)."""
    return sum(x for run in samples for x in (run if isinstance(run, list) else [run]))


def interleaved_comparison(args) -> dict[str, Any]:
    """ORT, ours and transformers in one process at `--interleaved-text-layers` decoder layers:
    per-stage statistics, ratios over transformers (of medians and paired), CPU use."""
    layers = ["--interleaved-text-layers", str(args.interleaved_text_layers), "--reduced-dir", args.reduced_dir]
    progress(f"interleaved comparison at {args.interleaved_text_layers} decoder layers: exporting {args.reduced_dir}")
    red = child("export-reduced", args, layers)
    progress("interleaved comparison: ORT (runtime) + ours + transformers in one process")
    r = child("interleaved", args, layers)
    names = (ORT, OURS, HF)
    inter = {"text_layers": args.interleaved_text_layers, "export_s": red["seconds"],
             "decoder_data_bytes": red["files"].get("decoder.onnx.data"), "peak_rss": r["peak_rss"],
             "load_avg_before": r["load_avg_before"], "load_avg_after": r["load_avg_after"], "stages": {}, "ratios": {}, "paired": {}}
    for stage, key in (("vision", "vision_s"), ("prefill", "prefill_s")):
        inter["stages"][stage] = {n: Stats.of(r[n][key]) for n in names}
        inter["paired"][stage] = {n: Stats.of(a / b for a, b in zip(r[n][key], r[HF][key])) for n in (ORT, OURS)}
    inter["stages"]["decode"] = {n: Stats.of(statistics.median(st) for st in r[n]["step_s"]) for n in names}
    inter["paired"]["decode"] = {n: Stats.of(a / b for sa, sb in zip(r[n]["step_s"], r[HF]["step_s"]) for a, b in zip(sa, sb))
                                 for n in (ORT, OURS)}
    for stage in ("vision", "prefill", "decode"):
        inter["ratios"][stage] = {n: ratio(inter["stages"][stage][n].median, inter["stages"][stage][HF].median) for n in (ORT, OURS)}
    inter["tokens_equal"] = {n: r[n]["tokens"] == r[OURS]["tokens"] for n in (ORT, HF)}
    # process CPU seconds per wall second while each candidate ran (spinning is off for ORT
    # and PyTorch here, so this is how many cores each kept busy)
    inter["cpu_per_wall"] = {stage: {n: _total(r[n][f"{key}_cpu_s"]) / _total(r[n][f"{key}_s"]) for n in names}
                             for stage, key in (("vision", "vision"), ("prefill", "prefill"), ("decode", "step"))}
    inter["samples"] = {n: r[n] for n in names}
    return inter


def summarize(samples: dict) -> dict[str, Any]:
    """Pooled statistics per stage and candidate, and the ratios over transformers: of the pooled
    medians, and per round (each round's ORT process against that round's eager process)."""
    measured = [k for k in samples if samples[k]["vision_s"]]
    stages: dict[str, dict[str, Any]] = {"vision": {}, "prefill": {}, "decode": {}}
    for n in measured:
        s = samples[n]
        stages["vision"][n] = Stats.of(s["vision_s"])
        stages["prefill"][n] = Stats.of(s["prefill_s"])
        stages["decode"][n] = Stats.of(statistics.median(st) for st in s["step_s"])  # per repeat: median step
    ratios = {st: {n: ratio(stages[st][n].median, stages[st][HF].median) for n in measured if n != HF} for st in stages}
    per_round = {}
    for n in measured:
        if n == HF:
            continue
        per_round[n] = [{
            "vision": ratio(statistics.median(a["vision_s"]), statistics.median(h["vision_s"])),
            "prefill": ratio(statistics.median(a["prefill_s"]), statistics.median(h["prefill_s"])),
            "decode": ratio(statistics.median(x for st in a["step_s"] for x in st), statistics.median(x for st in h["step_s"] for x in st)),
        } for a, h in zip(samples[n]["rounds"], samples[HF]["rounds"])]
    return {"stages": stages, "ratios_over_transformers": ratios, "ratios_over_transformers_per_round": per_round}


def agreement(samples: dict, workdir: Path) -> dict[str, Any]:
    """First-token logits (saved by the children) and first greedy tokens, against ours."""
    measured = [k for k in samples if samples[k]["vision_s"]]
    out: dict[str, Any] = {}
    if (workdir / "logits_ours.npy").is_file():
        ref = np.load(workdir / "logits_ours.npy")
        for n in (ORT, ORT_PREPACK, HF):
            f = workdir / f"logits_{n}.npy"
            if f.is_file() and n in measured:
                out[f"{n}_vs_ours_first_logits_max_abs_diff"] = float(np.abs(np.load(f) - ref).max())
        out["first_logits_max_abs"] = float(np.abs(ref).max())
    tok_ours = samples[OURS]["rounds"][0]["tokens"][0] if samples[OURS]["rounds"] else None
    for n in (ORT, ORT_PREPACK, HF):
        if n in measured and tok_ours is not None:
            out[f"{n}_greedy_tokens_equal_ours"] = samples[n]["rounds"][0]["tokens"][0] == tok_ours
    out["greedy_tokens_ours"] = tok_ours
    return out


def setup(args, cfg, preset_cfg, prompt_len: int) -> dict[str, Any]:
    return {
        "preset": args.preset, "checkpoint": args.checkpoint, "onnx_dir": args.onnx_dir, "dtype": "float32", "batch": 1,
        "text_layers": cfg.text.num_hidden_layers, "text_layers_in_preset": preset_cfg.text.num_hidden_layers,
        "vision_layers": cfg.vision.num_hidden_layers, "vision_layers_in_preset": preset_cfg.vision.num_hidden_layers,
        "image_tokens": cfg.num_image_tokens, "prompt_len": prompt_len, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"), "transformers_attn": args.hf_attn,
        "ort_runtime": "pgexport.runtime.OnnxPaliGemma",
    }


# --------------------------------------------------------------------------- report
def render_markdown(results: dict) -> str:
    lines = header_lines(results)
    if results["export"]:
        lines += export_lines(results)
    if results["interleaved"]:
        lines += interleaved_lines(results)
    return "\n".join(lines + full_depth_lines(results) + memory_lines(results))


def _digits(stage: str) -> int:
    return 0 if stage != "decode" else 1


def header_lines(results: dict) -> list[str]:
    s = results["setup"]
    return [
        "# ONNX Runtime fp32 vs eager PyTorch (ours) vs transformers",
        "",
        f"`{command_line('bench_onnx.py').strip()}`",
        "",
        f"- model: `{s['preset']}` geometry ({s['vision_layers']}/{s['vision_layers_in_preset']} vision, "
        f"{s['text_layers']}/{s['text_layers_in_preset']} decoder layers), fp32, batch 1, random weights from one checkpoint "
        f"(`pgexport init`), the same tensors in every candidate",
        f"- input: {s['image_tokens']} image tokens + {s['prompt_len'] - s['image_tokens']} text tokens = {s['prompt_len']}; "
        f"{s['new_tokens']} greedy decode steps; prefill = time to the first token's logits, vision encoder included (as in "
        "`bench_eager.py`); decode = per token (median step of each generation)",
        f"- ORT: `{s['ort_runtime']}` (its default `share_weights=True`: decoder data memory-mapped once for prefill and decode, "
        f"no prepacking; the vision session prepacks), {s['threads']} intra-op threads, CPU EP; eager: {s['threads']} torch threads, "
        f"OMP_WAIT_POLICY={s['omp_wait_policy']}, transformers attention `{s['transformers_attn']}`",
        "",
    ]


def export_lines(results: dict) -> list[str]:
    ex = results["export"]
    e = ex["export"]
    return ["## Export (`export_folder(checkpoint)`: weights streamed from the safetensors files)", "",
            markdown_table(["wall s", "peak RSS GiB", "fp32 weights GiB", "peak / weights", "files on disk GiB", "data / checkpoint"], [[
                f"{ex['seconds']:.0f}", f"{gib(ex['peak_rss']):.2f}", f"{gib(e['fp32_param_bytes']):.2f}",
                f"{ex['peak_rss'] / e['fp32_param_bytes']:.2f}x", f"{gib(results['disk']['total_bytes']):.2f}",
                f"{results['disk']['weight_bytes'] / results['disk']['checkpoint_bytes']:.3f}x"]]),
            "", "Target: export peak RSS <= 1.5x the fp32 weight bytes. Peak = the libraries + the graph + about one "
            "tensor (the largest, the embedding table); the model is never loaded.", ""]


def interleaved_lines(results: dict) -> list[str]:
    s, inter = results["setup"], results["interleaved"]
    n = inter["text_layers"]
    lines = [f"## Ratios: one process, interleaved, {n} of {s['text_layers_in_preset']} decoder layers", "",
             f"The three candidates in ONE process (ORT through the runtime on an export of the first {n} decoder layers; "
             "ours and transformers sharing the same tensors), interleaved: vision calls rotate, the three prefills "
             "alternate, and decode steps are interleaved one by one, so a change in the shared machine's load hits all "
             "alike. ORT's sessions here do not spin-wait (`session.intra_op.allow_spinning=0`), as PyTorch's OpenMP "
             "threads do not (PASSIVE). Vision is the full encoder; prefill and decode have full widths and the full "
             f"LM head but {n} decoder layers. These ratios are the ones judged against the targets.", ""]
    rows = []
    for stage, label in STAGES:
        x, d = inter["stages"][stage], _digits(stage)
        r, pr = inter["ratios"][stage][ORT], inter["paired"][stage][ORT]
        c = inter["cpu_per_wall"][stage]
        rows.append([label, fmt_stats_ms(x[ORT], d), fmt_stats_ms(x[OURS], d), fmt_stats_ms(x[HF], d), f"{r:.2f}",
                     f"{pr.median:.2f} ({pr.p10:.2f}-{pr.p90:.2f}, n={pr.n})",
                     f"<= {TARGETS[stage]}: {'met' if max(r, pr.median) <= TARGETS[stage] else 'NOT met'}",
                     f"{inter['ratios'][stage][OURS]:.2f}", f"{c[ORT]:.2f} / {c[OURS]:.2f} / {c[HF]:.2f}"])
    lines.append(markdown_table(["stage (ms, median (p10-p90))", "ORT fp32", "ours eager", "transformers eager", "ORT / tf (medians)",
                                 "ORT / tf paired", "target", "ours / tf", "CPU s per wall s ORT / ours / tf"], rows))
    lines += ["", "CPU s per wall s: process CPU time over wall time while the candidate ran, i.e. how many of the "
              f"{s['threads']} threads it kept busy (no spin-waiting on either side here). PyTorch runs a single-row "
              "linear (decode) on one thread in this build; ONNX Runtime's GEMM splits it over its threads, which is "
              "where its decode advantage comes from on an otherwise idle machine (and why it shrinks when the "
              "neighbours keep the second core busy, see the full-depth rounds)."]
    dec_bytes = inter["decoder_data_bytes"]
    bw = {k: dec_bytes / inter["stages"]["decode"][k].median / 1e9 for k in (ORT, OURS, HF)}
    lines += ["", f"Decode reads every decoder weight once per token ({dec_bytes / 2**30:.2f} GiB here, the tied embedding "
              f"included as the LM head): effective weight bandwidth ORT {bw[ORT]:.1f}, ours {bw[OURS]:.1f}, transformers "
              f"{bw[HF]:.1f} GB/s. Greedy tokens equal to ours: ORT {inter['tokens_equal'][ORT]}, transformers "
              f"{inter['tokens_equal'][HF]}. Process peak RSS {gib(inter['peak_rss']):.2f} GiB; load average (1 min) "
              f"{inter['load_avg_before'][0]:.1f} -> {inter['load_avg_after'][0]:.1f}.", ""]
    return lines


def full_depth_lines(results: dict) -> list[str]:
    s, st = results["setup"], results["stages"]
    lines = ["## Full depth: absolute numbers (separate processes, one after the other)", "",
             f"Three fp32 copies of the full model do not fit in memory, so here ORT and the eager pair (ours + transformers, "
             f"interleaved inside their process) run in separate fresh processes, alternating over {s['rounds']} rounds "
             f"({s['repeats']} timed repeats + {s['warmup']} warm-up each). The machine is shared: the load (table below) "
             "changes between processes, so ratios across processes are indicative only (per round below); "
             f"{LABELS[ORT_PREPACK]} is ONNX Runtime's default loading (each session copies and prepacks its weights, "
             "`share_weights=False`) in a minimal loop holding only the session of the stage it times, because prefill and "
             f"decode sessions with a prepacked copy each (2 x {gib(results['disk']['files'].get('decoder.onnx.data', 0)):.1f} GiB) "
             "do not fit together in this machine's memory.", ""]
    names = [n for n in (ORT, ORT_PREPACK, OURS, HF) if n in st["vision"]]
    rows = [[label] + [fmt_stats_ms(st[stage][n], _digits(stage)) for n in names] for stage, label in STAGES]
    lines.append(markdown_table(["stage (ms, median (p10-p90) over all rounds)"] + [LABELS[n] for n in names], rows))
    lines += ["", "Per-round ratios over transformers (each round's ORT process against that round's eager process):", ""]
    pr_rows = [[n, i + 1, f"{r['vision']:.2f}", f"{r['prefill']:.2f}", f"{r['decode']:.2f}"]
               for n, rounds in results["ratios_over_transformers_per_round"].items() for i, r in enumerate(rounds)]
    lines.append(markdown_table(["candidate", "round", "vision", "prefill", "decode"], pr_rows))
    return lines


def memory_lines(results: dict) -> list[str]:
    lines = ["", "## Memory and load (full depth)", ""]
    mrows = []
    for p in results["processes"]:
        load = f"{p['load_avg_before'][0]:.1f} -> {p['load_avg_after'][0]:.1f}"
        if p["kind"] == "eager":
            mrows.append([f"eager (ours + transformers), round {p['round'] + 1}", "-", f"{gib(p['rss_after_load']):.2f}",
                          f"{gib(p['peak_rss']):.2f}", load])
        else:
            mrows.append([f"{LABELS[p['kind']]}, round {p['round'] + 1}", f"{p['load_s']:.1f}", f"{gib(p['rss_after_load']):.2f}",
                          f"{gib(p['peak_rss']):.2f}", load])
    lines.append(markdown_table(["process", "session load s", "RSS after load GiB", "peak RSS GiB", "load average (1 min) before -> after"], mrows))
    lines += ["", "RSS includes the resident pages of memory-mapped weight files (file-backed, shared with the page cache): "
              "the runtime's sessions map `decoder.onnx.data` once for both graphs; the eager process maps the checkpoint "
              "once for both models. The prepacked variant's RSS is that of its largest single session (anonymous memory).", ""]
    for k, v in results["skipped"].items():
        lines.append(f"- {LABELS[k]} not measured: {v}.")
    d = results["disk"]
    lines += ["", "## Disk", "", markdown_table(["file", "MiB"], [[k, f"{v / 2**20:.1f}"] for k, v in d["files"].items()]),
              "", f"Total {gib(d['total_bytes']):.2f} GiB; the checkpoint's safetensors {gib(d['checkpoint_bytes']):.2f} GiB.", ""]
    ag = dict(results["agreement"])
    toks = ag.pop("greedy_tokens_ours", None)
    lines += ["## Agreement (full depth, first-token logits and greedy tokens against ours)", "", "```", json.dumps(ag, indent=1),
              f"greedy tokens (ours): {toks}", "```", "", "## Machine", "", machine_markdown(results["machine"])]
    return lines


if __name__ == "__main__":
    sys.exit(main())
