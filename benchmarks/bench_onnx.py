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
   prefill's cache), because at 3B fp32 two prepacked copies of the decoder do not fit in 24 GB;
3. our eager model (`pgexport.load_model`, weights memory-mapped from the checkpoint) and
   transformers' `PaliGemmaForConditionalGeneration` (sdpa attention) holding the *same* tensors
   (assigned, not copied), in one fresh process, interleaved exactly as `bench_eager.py` does.

Why separate processes: three fp32 copies of a 3B model do not fit in 24 GB, and an ONNX
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
import subprocess
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
    Stats,
    current_rss_bytes,
    fmt_stats_ms,
    gib,
    machine_info,
    machine_markdown,
    markdown_table,
    peak_rss_bytes,
    progress,
    ratio,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
ORT, ORT_PREPACK, OURS, HF = "ort", "ort_prepack", "ours", "transformers"
LABELS = {ORT: "ORT fp32 (runtime, share_weights: no prepack)", ORT_PREPACK: "ORT fp32 prepacked (one session at a time)",
          OURS: "ours eager", HF: "transformers eager"}


# --------------------------------------------------------------------------- inputs
def make_inputs(cfg, prompt_tokens: int, seed: int):
    """`<image>` * N + <bos> + random prompt tokens + "\\n" and a random image in [-1, 1] (numpy),
    the same as bench_eager.make_inputs."""
    rng = np.random.default_rng(seed + 1)
    n_mid = max(prompt_tokens - 2, 0)
    high = min(200000, cfg.image_token_id - 1152)  # ordinary text tokens (tiny vocabularies too)
    text = [cfg.bos_token_id] + rng.integers(min(1000, high // 2), high, n_mid).tolist() + [108]
    ids = np.array([[cfg.image_token_id] * cfg.num_image_tokens + text], dtype=np.int64)
    px = (rng.random((1, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=np.float32) * 2 - 1).astype(np.float32)
    return ids, np.ones_like(ids), px


def _load_avg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def _emit(obj: dict) -> None:
    print("@@RESULT " + json.dumps(obj), flush=True)


# --------------------------------------------------------------------------- children
def child_export(args) -> None:
    from benchmarks.common import reset_peak_rss
    from pgexport.exporters.pipeline import export_folder

    reset_peak_rss()
    base = current_rss_bytes()
    t = time.perf_counter()
    res = export_folder(args.checkpoint, args.onnx_dir, quant="fp32", validate=False, overwrite=True, progress=progress)
    _emit({"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes(), "rss_before": base,
           "files": res["files"], "total_bytes": res["total_bytes"], "export": res["export"]})


def child_ort(args) -> None:
    if args.variant == ORT_PREPACK:
        return child_ort_prepacked(args)
    from pgexport.models.config import PaliGemmaConfig
    from pgexport.runtime import OnnxPaliGemma

    cfg = PaliGemmaConfig.from_json_file(Path(args.onnx_dir) / "config.json")
    ids, mask, px = make_inputs(cfg, args.prompt_tokens, args.seed)
    share = args.variant == ORT
    base = current_rss_bytes()
    t = time.perf_counter()
    model = OnnxPaliGemma(args.onnx_dir, threads=args.threads, share_weights=share)
    load_s = time.perf_counter() - t
    rss_load = current_rss_bytes()
    vision, prefill, steps, tokens = [], [], [], []
    first_logits = None

    def generation(n_new: int):
        stepper = model.stepper()
        t0 = time.perf_counter()
        logits = stepper.prefill(ids, mask, px, n_new)
        p = time.perf_counter() - t0
        toks, st = [int(logits[0].argmax())], []
        for _ in range(n_new):
            t0 = time.perf_counter()
            logits = stepper.decode(np.array([toks[-1]], np.int64))
            st.append(time.perf_counter() - t0)
            toks.append(int(logits[0].argmax()))
        return p, st, toks

    for w in range(args.warmup):
        t0 = time.perf_counter()
        model.encode_image(px)
        progress(f"[{args.variant}] warm-up vision {time.perf_counter() - t0:.2f}s")
        p, st, _ = generation(min(args.new_tokens, 4))
        progress(f"[{args.variant}] warm-up prefill {p:.2f}s decode {statistics.median(st) * 1e3:.0f} ms/token")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        model.encode_image(px)
        vision.append(time.perf_counter() - t0)
        p, st, toks = generation(args.new_tokens)
        prefill.append(p)
        steps.append(st)
        tokens.append(toks)
        progress(f"[{args.variant}] repeat {r + 1}/{args.repeats}: vision {vision[-1]:.2f}s, prefill {p:.2f}s, "
                 f"decode {statistics.median(st) * 1e3:.0f} ms/token")
    stepper = model.stepper()
    first_logits = stepper.prefill(ids, mask, px, 1)
    np.save(Path(args.workdir) / f"logits_{args.variant}.npy", first_logits)
    _emit({"load_s": load_s, "rss_before": base, "rss_after_load": rss_load, "rss_after_run": current_rss_bytes(),
           "peak_rss": peak_rss_bytes(), "vision_s": vision, "prefill_s": prefill, "step_s": steps, "tokens": tokens,
           "threads": args.threads, "share_weights": share})


def child_ort_prepacked(args) -> None:
    """ORT with prepacking (each session copies and prepacks its weights), one session at a time.

    Prefill and decode sessions that each hold a prepacked copy of the decoder weights do not fit
    in memory together at 3B fp32 on this machine, so each stage runs with only its own session
    loaded: vision, then prefill (its KV cache kept), then decode from that cache. The per-stage
    speed is what `share_weights=False` gives; its memory is reported per session.
    """
    import onnxruntime as ort

    from pgexport.models.config import PaliGemmaConfig

    folder = Path(args.onnx_dir)
    cfg = PaliGemmaConfig.from_json_file(folder / "config.json")
    ids, mask, px = make_inputs(cfg, args.prompt_tokens, args.seed)
    L = cfg.text.num_hidden_layers
    past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    base = current_rss_bytes()

    def session(name):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = args.threads
        t0 = time.perf_counter()
        s = ort.InferenceSession(str(folder / name), so, providers=["CPUExecutionProvider"])
        return s, time.perf_counter() - t0

    out = {"load_s": 0.0, "rss_before": base, "rss_per_session": {}, "threads": args.threads, "share_weights": False}
    vis_s, load = session("vision_encoder.onnx")
    out["load_s"] += load
    out["rss_per_session"]["vision_encoder"] = current_rss_bytes() - base
    vision = []
    for r in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        (feats,) = vis_s.run(None, {"pixel_values": px})
        if r >= args.warmup:
            vision.append(time.perf_counter() - t0)
    del vis_s
    pre_s, load = session("prefill.onnx")
    out["load_s"] += load
    out["rss_per_session"]["prefill"] = current_rss_bytes() - base
    prefill = []
    vis_median = statistics.median(vision)
    for r in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        res = pre_s.run(None, {"input_ids": ids, "image_features": feats, "attention_mask": mask})
        if r >= args.warmup:
            prefill.append(time.perf_counter() - t0 + vis_median)  # + vision: time to the first logits
    np.save(Path(args.workdir) / f"logits_{args.variant}.npy", res[0])
    first_token, past0 = int(res[0][0].argmax()), res[1:]
    del pre_s, res
    dec_s, load = session("decode.onnx")
    out["load_s"] += load
    out["rss_per_session"]["decode"] = current_rss_bytes() - base
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
    out.update({"rss_after_load": base + max(out["rss_per_session"].values()), "rss_after_run": current_rss_bytes(),
                "peak_rss": peak_rss_bytes(), "vision_s": vision, "prefill_s": prefill, "step_s": steps, "tokens": tokens})
    _emit(out)


def child_eager(args) -> None:
    import torch

    from benchmarks.bench_eager import HFRunner, OursRunner, paired_generation
    from benchmarks.common import interleaved

    torch.set_num_threads(args.threads)
    ours, hf = build_eager_pair(args.checkpoint, args.hf_attn)
    cfg = ours.cfg
    ids, mask, px = make_inputs(cfg, args.prompt_tokens, args.seed)
    ids, mask, px = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)
    runners = {OURS: OursRunner(ours, ids, mask, px), HF: HFRunner(hf, ids, mask, px)}
    rss_load = current_rss_bytes()
    with torch.inference_mode():
        vis = interleaved({n: r.vision for n, r in runners.items()}, args.repeats, args.warmup, label="vision")
        for w in range(args.warmup):
            paired_generation(runners, min(args.new_tokens, 4), first=w)
        gen = []
        for r in range(args.repeats):
            g = paired_generation(runners, args.new_tokens, first=r + args.round)
            gen.append(g)
            progress(f"[eager] repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} prefill {g[n]['prefill_s']:.2f}s decode {statistics.median(g[n]['step_s']) * 1e3:.0f} ms/token" for n in runners))
        runners[OURS].prefill(1)
        np.save(Path(args.workdir) / "logits_ours.npy", runners[OURS].logits)
        runners[HF].prefill(1)
        np.save(Path(args.workdir) / "logits_transformers.npy", runners[HF].logits.float().numpy())
    out = {"rss_after_load": rss_load, "peak_rss": peak_rss_bytes(), "threads": args.threads}
    for n in runners:
        out[n] = {"vision_s": [r.seconds for r in vis[n].runs], "prefill_s": [g[n]["prefill_s"] for g in gen],
                  "step_s": [g[n]["step_s"] for g in gen], "tokens": [g[n]["tokens"] for g in gen]}
    _emit(out)


def build_eager_pair(checkpoint: str, attn: str):
    """Ours loaded from the checkpoint (memory-mapped), transformers built without initialising
    its parameters and then given ours' tensors: one copy of the weights for both."""
    import pgexport

    ours = pgexport.load_model(checkpoint, dtype="float32").eval()
    return ours, hf_sharing(ours, attn)


def hf_sharing(ours, attn: str):
    """transformers' model built without initialising its parameters, then given ours' tensors."""
    import torch
    import transformers
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from pgexport.models.checkpoint import to_internal_name

    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.PaliGemmaConfig.from_dict(ours.cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    with no_init_weights():  # parameters allocated but never touched (no resident pages)
        hf = PaliGemmaForConditionalGeneration(hf_cfg).to(torch.float32)
    state = ours.state_dict()
    mapped = {}
    for name in hf.state_dict():
        # the tied head is the embedding table: map it explicitly so every key is accounted for
        src = "language_model.embed_tokens.weight" if name == "lm_head.weight" else to_internal_name(name)
        mapped[name] = state[src]
    hf.load_state_dict(mapped, strict=True, assign=True)
    hf.tie_weights()
    hf.eval()
    ours_ptrs = {p.data_ptr() for p in ours.parameters()}
    not_shared = [n for n, p in hf.named_parameters() if p.data_ptr() not in ours_ptrs]
    if not_shared:
        raise RuntimeError(f"transformers parameters not shared with ours: {not_shared[:5]}")
    return hf


def reduce_depth(model, text_layers: int):
    """A model with the first `text_layers` decoder layers of `model`, sharing its tensors."""
    import torch

    from pgexport.models import PaliGemma

    t = model.cfg.text
    text = {"num_hidden_layers": text_layers}
    if t.layer_types:
        text["layer_types"] = t.layer_types[:text_layers]
    cfg = model.cfg.replace(text=text)
    with torch.device("meta"):
        small = PaliGemma(cfg)
    keep = set(small.state_dict())
    small.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep}, strict=True, assign=True)
    return small.eval()


class OrtRunner:
    """`pgexport.runtime.OnnxPaliGemma` with the runner interface of bench_eager (numpy in)."""

    def __init__(self, model, ids, mask, px):
        self.model, self.ids, self.mask, self.px = model, ids, mask, px

    def vision(self):
        return self.model.encode_image(self.px)

    def prefill(self, new_tokens: int) -> int:
        self.stepper = self.model.stepper()
        self.logits = self.stepper.prefill(self.ids, self.mask, self.px, new_tokens)
        return int(self.logits[0].argmax())

    def decode(self, token: int) -> int:
        self.logits = self.stepper.decode(np.array([token], np.int64))
        return int(self.logits[0].argmax())


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
    _emit({"seconds": time.perf_counter() - t, "files": res["files"]})


def child_interleaved(args) -> None:
    """ORT (the runtime, share_weights), ours and transformers in one process at reduced decoder
    depth, interleaved stage by stage and decode step by step."""
    import torch

    import pgexport
    from benchmarks.bench_eager import HFRunner, OursRunner, paired_generation
    from benchmarks.common import interleaved

    torch.set_num_threads(args.threads)
    _no_spinning_sessions()
    from pgexport.runtime import OnnxPaliGemma

    ours = reduce_depth(pgexport.load_model(args.checkpoint, dtype="float32"), args.interleaved_text_layers)
    hf = hf_sharing(ours, args.hf_attn)
    ort_model = OnnxPaliGemma(args.reduced_dir, threads=args.threads, share_weights=True)
    ids, mask, px = make_inputs(ours.cfg, args.prompt_tokens, args.seed)
    tids, tmask, tpx = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)
    runners = {ORT: OrtRunner(ort_model, ids, mask, px), OURS: OursRunner(ours, tids, tmask, tpx), HF: HFRunner(hf, tids, tmask, tpx)}
    with torch.inference_mode():
        vis = interleaved({n: r.vision for n, r in runners.items()}, args.repeats * args.rounds, args.warmup, label="vision")
        for w in range(args.warmup):
            paired_generation(runners, min(args.new_tokens, 4), first=w)
        gen = []
        for r in range(args.repeats * args.rounds):
            g = paired_generation(runners, args.new_tokens, first=r)
            gen.append(g)
            progress(f"[interleaved] repeat {r + 1}/{args.repeats * args.rounds}: " + ", ".join(
                f"{n} prefill {g[n]['prefill_s']:.2f}s decode {statistics.median(g[n]['step_s']) * 1e3:.0f} ms" for n in runners))
    out = {"rss_after_run": current_rss_bytes(), "peak_rss": peak_rss_bytes(), "text_layers": args.interleaved_text_layers}
    for n in runners:
        out[n] = {"vision_s": [r.seconds for r in vis[n].runs], "vision_cpu_s": [r.cpu_seconds for r in vis[n].runs],
                  "prefill_s": [g[n]["prefill_s"] for g in gen], "prefill_cpu_s": [g[n]["prefill_cpu_s"] for g in gen],
                  "step_s": [g[n]["step_s"] for g in gen], "step_cpu_s": [g[n]["step_cpu_s"] for g in gen],
                  "tokens": [g[n]["tokens"] for g in gen]}
    _emit(out)


# --------------------------------------------------------------------------- parent
def run_child(kind: str, args, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--checkpoint", str(args.checkpoint),
           "--onnx-dir", str(args.onnx_dir), "--workdir", str(args.workdir), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--seed", str(args.seed), "--hf-attn", args.hf_attn,
           *(extra or [])]
    before = _load_avg()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("@@RESULT "):
            result = json.loads(line[len("@@RESULT "):])
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"child {kind} failed (exit {proc.returncode})")
    result["wall_s"] = time.perf_counter() - t
    result["load_avg_before"], result["load_avg_after"] = before, _load_avg()
    return result


def ensure_checkpoint(args) -> dict | None:
    if (Path(args.checkpoint) / "config.json").is_file():
        return None
    progress(f"writing {args.checkpoint} (random weights, pgexport init)")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pgexport.cli", "init", "--preset", args.preset, "--out", str(args.checkpoint)],
                   check=True, cwd=ROOT)
    return {"seconds": time.perf_counter() - t}


def free_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def main(argv=None) -> int:
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
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ap.add_argument("--prepack", default="both", choices=["off", "on", "both"],
                    help="ORT variants: share_weights (prepack off), prepack on, or both (prepack on only if it fits in memory)")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--omp-wait-policy", default=None, choices=["passive", "active", "default"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_fp32"))
    ap.add_argument("--interleaved-text-layers", type=int, default=6,
                    help="decoder layers of the one-process interleaved comparison (0: skip it)")
    ap.add_argument("--reduced-dir", default=None, help="default: WORKDIR/PRESET-L{N}-onnx-fp32")
    ap.add_argument("--child", default=None, choices=["export", "ort", "eager", "export-reduced", "interleaved"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=ORT, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.checkpoint = args.checkpoint or str(Path(args.workdir) / f"{args.preset}-float32")
    args.onnx_dir = args.onnx_dir or str(Path(args.workdir) / f"{args.preset}-onnx-fp32")
    args.reduced_dir = args.reduced_dir or str(Path(args.workdir) / f"{args.preset}-L{args.interleaved_text_layers}-onnx-fp32")

    if args.child == "export":
        child_export(args)
        return 0
    if args.child == "ort":
        child_ort(args)
        return 0
    if args.child == "eager":
        child_eager(args)
        return 0
    if args.child == "export-reduced":
        child_export_reduced(args)
        return 0
    if args.child == "interleaved":
        child_interleaved(args)
        return 0

    info = machine_info(["onnxscript", "onnx_ir"])
    progress(f"machine: {info['cpu_model']}, {info['usable_cores']} cores, {info['mem_available_gib']} GiB available")
    init = ensure_checkpoint(args)
    for stale in Path(args.workdir).glob("logits_*.npy"):  # written by this run's children
        stale.unlink()
    results: dict[str, Any] = {"benchmark": "onnx_fp32", "machine": info, "init": init}

    from pgexport.models.config import PaliGemmaConfig
    from pgexport.models.checkpoint import read_config

    cfg = read_config(args.checkpoint)
    preset_cfg = PaliGemmaConfig.from_preset(args.preset)
    ids, _, _ = make_inputs(cfg, args.prompt_tokens, args.seed)

    if args.reuse_export and (Path(args.onnx_dir) / "pgexport.json").is_file():
        progress(f"reusing the export in {args.onnx_dir}")
        export = None
    else:
        progress(f"exporting {args.checkpoint} -> {args.onnx_dir} (fresh process)")
        export = run_child("export", args)
        progress(f"export: {export['seconds']:.0f}s, peak RSS {gib(export['peak_rss']):.2f} GiB")
    files = {p.name: p.stat().st_size for p in sorted(Path(args.onnx_dir).iterdir()) if p.is_file()}
    weight_bytes = sum(v for k, v in files.items() if k.endswith(".data"))
    fp32_param_bytes = sum(p.stat().st_size for p in Path(args.checkpoint).glob("*.safetensors"))

    variants = [ORT] if args.prepack == "off" else [ORT_PREPACK] if args.prepack == "on" else [ORT, ORT_PREPACK]
    skipped = {}
    samples: dict[str, dict[str, list]] = {k: {"vision_s": [], "prefill_s": [], "step_s": [], "rounds": []} for k in [*variants, OURS, HF]}
    procs: list[dict] = []
    for rnd in range(args.rounds):
        order = ["ort", "eager"] if rnd % 2 == 0 else ["eager", "ort"]
        for kind in order:
            if kind == "eager":
                progress(f"round {rnd + 1}/{args.rounds}: eager (ours + transformers, shared weights)")
                r = run_child("eager", args, ["--round", str(rnd)])
                procs.append({"kind": "eager", "round": rnd, **{k: v for k, v in r.items() if k not in (OURS, HF)}})
                for n in (OURS, HF):
                    for key in ("vision_s", "prefill_s", "step_s"):
                        samples[n][key] += r[n][key]
                    samples[n]["rounds"].append(r[n])
                continue
            for variant in variants:
                if variant == ORT_PREPACK:
                    # one session at a time, each with its own prepacked copy of its weights
                    need = files.get("decoder.onnx.data", 0)
                    if gib(need) + 1.0 > free_gib():
                        skipped[variant] = f"needs ~{gib(need):.1f} GiB for one prepacked session, {free_gib():.1f} GiB available"
                        progress(f"round {rnd + 1}: skipping {variant}: {skipped[variant]}")
                        continue
                progress(f"round {rnd + 1}/{args.rounds}: {LABELS[variant]}")
                r = run_child("ort", args, ["--variant", variant, "--round", str(rnd)])
                procs.append({"kind": variant, "round": rnd, **{k: v for k, v in r.items() if k not in ("vision_s", "prefill_s", "step_s", "tokens")}})
                for key in ("vision_s", "prefill_s", "step_s"):
                    samples[variant][key] += r[key]
                samples[variant]["rounds"].append({k: r[k] for k in ("vision_s", "prefill_s", "step_s", "tokens")})

    # ------------------------------------------------------------------ interleaved, reduced depth
    inter = None
    if args.interleaved_text_layers > 0:
        progress(f"interleaved comparison at {args.interleaved_text_layers} decoder layers: exporting {args.reduced_dir}")
        red = run_child("export-reduced", args, ["--interleaved-text-layers", str(args.interleaved_text_layers), "--reduced-dir", args.reduced_dir])
        progress("interleaved comparison: ORT (runtime) + ours + transformers in one process")
        r = run_child("interleaved", args, ["--interleaved-text-layers", str(args.interleaved_text_layers), "--reduced-dir", args.reduced_dir])
        inter = {"text_layers": args.interleaved_text_layers, "export_s": red["seconds"],
                 "decoder_data_bytes": red["files"].get("decoder.onnx.data"), "peak_rss": r["peak_rss"],
                 "load_avg_before": r["load_avg_before"], "load_avg_after": r["load_avg_after"], "stages": {}, "ratios": {}, "paired": {}}
        for stage, key in (("vision", "vision_s"), ("prefill", "prefill_s")):
            inter["stages"][stage] = {n: Stats.of(r[n][key]) for n in (ORT, OURS, HF)}
            for n in (ORT, OURS):
                inter["paired"].setdefault(stage, {})[n] = Stats.of(a / b for a, b in zip(r[n][key], r[HF][key]))
        inter["stages"]["decode"] = {n: Stats.of(statistics.median(st) for st in r[n]["step_s"]) for n in (ORT, OURS, HF)}
        for n in (ORT, OURS):
            inter["paired"].setdefault("decode", {})[n] = Stats.of(
                a / b for sa, sb in zip(r[n]["step_s"], r[HF]["step_s"]) for a, b in zip(sa, sb))
        for stage in ("vision", "prefill", "decode"):
            inter["ratios"][stage] = {n: ratio(inter["stages"][stage][n].median, inter["stages"][stage][HF].median) for n in (ORT, OURS)}
        inter["tokens_equal"] = {n: r[n]["tokens"] == r[OURS]["tokens"] for n in (ORT, HF)}
        # process CPU seconds per wall second while each candidate ran (spinning is off for ORT
        # and PyTorch here, so this is how many cores each kept busy)
        inter["cpu_per_wall"] = {
            stage: {n: sum(x for run in (r[n][f"{key}_cpu_s"] if stage != "decode" else r[n]["step_cpu_s"]) for x in (run if isinstance(run, list) else [run]))
                    / sum(x for run in (r[n][f"{key}_s"] if stage != "decode" else r[n]["step_s"]) for x in (run if isinstance(run, list) else [run]))
                    for n in (ORT, OURS, HF)}
            for stage, key in (("vision", "vision"), ("prefill", "prefill"), ("decode", "step"))}
        inter["samples"] = {n: r[n] for n in (ORT, OURS, HF)}

    # ------------------------------------------------------------------ summaries
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
        per_round[n] = []
        for i, (a, h) in enumerate(zip(samples[n]["rounds"], samples[HF]["rounds"])):
            per_round[n].append({
                "vision": ratio(statistics.median(a["vision_s"]), statistics.median(h["vision_s"])),
                "prefill": ratio(statistics.median(a["prefill_s"]), statistics.median(h["prefill_s"])),
                "decode": ratio(statistics.median(x for st in a["step_s"] for x in st), statistics.median(x for st in h["step_s"] for x in st)),
            })

    agreement = {}
    wd = Path(args.workdir)
    if (wd / "logits_ours.npy").is_file():
        ref = np.load(wd / "logits_ours.npy")
        for n in (ORT, ORT_PREPACK, HF):
            f = wd / f"logits_{n}.npy"
            if f.is_file() and n in measured:
                got = np.load(f)
                agreement[f"{n}_vs_ours_first_logits_max_abs_diff"] = float(np.abs(got - ref).max())
        agreement["first_logits_max_abs"] = float(np.abs(ref).max())
    tok_ours = samples[OURS]["rounds"][0]["tokens"][0] if samples[OURS]["rounds"] else None
    for n in (ORT, ORT_PREPACK, HF):
        if n in measured and tok_ours is not None:
            toks = samples[n]["rounds"][0]["tokens"][0]
            agreement[f"{n}_greedy_tokens_equal_ours"] = toks == tok_ours
    agreement["greedy_tokens_ours"] = tok_ours

    results.update({
        "setup": {
            "preset": args.preset, "checkpoint": args.checkpoint, "onnx_dir": args.onnx_dir, "dtype": "float32", "batch": 1,
            "text_layers": cfg.text.num_hidden_layers, "text_layers_in_preset": preset_cfg.text.num_hidden_layers,
            "vision_layers": cfg.vision.num_hidden_layers, "vision_layers_in_preset": preset_cfg.vision.num_hidden_layers,
            "image_tokens": cfg.num_image_tokens, "prompt_len": int(ids.shape[1]), "new_tokens": args.new_tokens,
            "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"), "transformers_attn": args.hf_attn,
            "ort_runtime": "pgexport.runtime.OnnxPaliGemma",
        },
        "export": export,
        "disk": {"files": files, "total_bytes": sum(files.values()), "weight_bytes": weight_bytes,
                 "checkpoint_bytes": fp32_param_bytes},
        "processes": procs,
        "skipped": skipped,
        "stages": stages,
        "ratios_over_transformers": ratios,
        "ratios_over_transformers_per_round": per_round,
        "agreement": agreement,
        "samples": samples,
        "interleaved": inter,
    })
    md = render_markdown(args, results, cfg)
    jpath, mpath = write_results(args.out, results, md)
    progress(f"wrote {jpath} and {mpath}")
    print(md)
    return 0


TARGETS = {"vision": 0.7, "prefill": 0.8, "decode": 0.8}


def render_markdown(args, results: dict, cfg) -> str:
    s, st, ex, inter = results["setup"], results["stages"], results["export"], results["interleaved"]
    cmd = "python benchmarks/bench_onnx.py " + " ".join(sys.argv[1:])
    lines = [
        "# ONNX Runtime fp32 vs eager PyTorch (ours) vs transformers",
        "",
        f"`{cmd.strip()}`",
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
    if ex:
        e = ex["export"]
        lines += ["## Export (`export_folder(checkpoint)`: weights streamed from the safetensors files)", "",
                  markdown_table(["wall s", "peak RSS GiB", "fp32 weights GiB", "peak / weights", "files on disk GiB", "data / checkpoint"], [[
                      f"{ex['seconds']:.0f}", f"{gib(ex['peak_rss']):.2f}", f"{gib(e['fp32_param_bytes']):.2f}",
                      f"{ex['peak_rss'] / e['fp32_param_bytes']:.2f}x", f"{gib(results['disk']['total_bytes']):.2f}",
                      f"{results['disk']['weight_bytes'] / results['disk']['checkpoint_bytes']:.3f}x"]]),
                  "", "Target: export peak RSS <= 1.5x the fp32 weight bytes. Peak = the libraries + the graph + about one "
                  "tensor (the 2 GiB embedding table); the model is never loaded.", ""]
    if inter:
        n = inter["text_layers"]
        lines += [f"## Ratios: one process, interleaved, {n} of {s['text_layers_in_preset']} decoder layers", "",
                  f"The three candidates in ONE process (ORT through the runtime on an export of the first {n} decoder layers; "
                  "ours and transformers sharing the same tensors), interleaved: vision calls rotate, the three prefills "
                  "alternate, and decode steps are interleaved one by one, so a change in the shared machine's load hits all "
                  "alike. ORT's sessions here do not spin-wait (`session.intra_op.allow_spinning=0`), as PyTorch's OpenMP "
                  "threads do not (PASSIVE). Vision is the full encoder; prefill and decode have full widths and the full "
                  f"LM head but {n} decoder layers. These ratios are the ones judged against the targets.", ""]
        rows = []
        for stage, label in (("vision", "vision encoder"), ("prefill", "prefill (to first logits)"), ("decode", "decode, per token")):
            x = inter["stages"][stage]
            r, pr = inter["ratios"][stage][ORT], inter["paired"][stage][ORT]
            rows.append([label, fmt_stats_ms(x[ORT], 0 if stage != "decode" else 1), fmt_stats_ms(x[OURS], 0 if stage != "decode" else 1),
                         fmt_stats_ms(x[HF], 0 if stage != "decode" else 1), f"{r:.2f}",
                         f"{pr.median:.2f} ({pr.p10:.2f}-{pr.p90:.2f}, n={pr.n})", f"<= {TARGETS[stage]}: {'met' if max(r, pr.median) <= TARGETS[stage] else 'NOT met'}",
                         f"{inter['ratios'][stage][OURS]:.2f}"])
        for row, stage in zip(rows, ("vision", "prefill", "decode")):
            c = inter["cpu_per_wall"][stage]
            row.append(f"{c[ORT]:.2f} / {c[OURS]:.2f} / {c[HF]:.2f}")
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
    lines += ["## Full depth: absolute numbers (separate processes, one after the other)", "",
              f"Three fp32 copies of the full model do not fit in memory, so here ORT and the eager pair (ours + transformers, "
              f"interleaved inside their process) run in separate fresh processes, alternating over {s['rounds']} rounds "
              f"({s['repeats']} timed repeats + {s['warmup']} warm-up each). The machine is shared: the load (table below) "
              "changes between processes, so ratios across processes are indicative only (per round below); "
              f"{LABELS[ORT_PREPACK]} is ONNX Runtime's default loading (each session copies and prepacks its weights, "
              "`share_weights=False`) in a minimal loop holding only the session of the stage it times, because prefill and "
              f"decode sessions with a prepacked copy each (2 x {gib(results['disk']['files'].get('decoder.onnx.data', 0)):.1f} GiB) "
              "do not fit together in this machine's memory.", ""]
    rows = []
    names = [n for n in (ORT, ORT_PREPACK, OURS, HF) if n in st["vision"]]
    for stage, label in (("vision", "vision encoder"), ("prefill", "prefill (to first logits)"), ("decode", "decode, per token")):
        row = [label] + [fmt_stats_ms(st[stage][n], 0 if stage != "decode" else 1) for n in names]
        rows.append(row)
    lines.append(markdown_table(["stage (ms, median (p10-p90) over all rounds)"] + [LABELS[n] for n in names], rows))
    lines += ["", "Per-round ratios over transformers (each round's ORT process against that round's eager process):", ""]
    pr_rows = []
    for n, rounds in results["ratios_over_transformers_per_round"].items():
        for i, r in enumerate(rounds):
            pr_rows.append([n, i + 1, f"{r['vision']:.2f}", f"{r['prefill']:.2f}", f"{r['decode']:.2f}"])
    lines.append(markdown_table(["candidate", "round", "vision", "prefill", "decode"], pr_rows))
    lines += ["", "## Memory and load (full depth)", ""]
    mrows = []
    for p in results["processes"]:
        if p["kind"] == "eager":
            mrows.append([f"eager (ours + transformers), round {p['round'] + 1}", "-", f"{gib(p['rss_after_load']):.2f}", f"{gib(p['peak_rss']):.2f}",
                          f"{p['load_avg_before'][0]:.1f} -> {p['load_avg_after'][0]:.1f}"])
        else:
            mrows.append([f"{LABELS[p['kind']]}, round {p['round'] + 1}", f"{p['load_s']:.1f}", f"{gib(p['rss_after_load']):.2f}",
                          f"{gib(p['peak_rss']):.2f}", f"{p['load_avg_before'][0]:.1f} -> {p['load_avg_after'][0]:.1f}"])
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
