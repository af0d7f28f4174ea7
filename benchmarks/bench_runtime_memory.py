"""Memory and speed of `OnnxPaliGemma`'s ways of holding an export's weights.

Modes (what `OnnxPaliGemma(...)` is given):

* `single`: `decoder.onnx` in one session (prefill and decode in one graph), weights memory-mapped
  and prepacked once, the mapped pages dropped after load (the default when the folder has it);
* `single-private`: `decoder.onnx` in one session that ONNX Runtime loads itself (`share_weights=False`);
* `split-shared`: prefill.onnx and decode.onnx in two sessions sharing the mapped data file
  (`single_decoder=False`; fp32 then runs without prepacking, quantized exports prepack per session);
* `split-private`: two sessions, ONNX Runtime loading and prepacking each graph itself
  (`single_decoder=False, share_weights=False`: the fastest CPU mode of the three-session runtime).

Memory: each (folder, mode) in a fresh process: RSS after importing the runtime (the baseline),
after load, and after one batch-1 `generate` of the bundled sample; the figure is (RSS after
generate - baseline) / the folder's graph and data bytes. Speed (`--speed`): the modes loaded
in one process, prefill (vision encoder included) and one decode step at each batch size,
interleaved, medians and ratios to `split-private`.

    python benchmarks/bench_runtime_memory.py /tmp/b3/fp32 /tmp/b3/int8 /tmp/b3/int4 \
        --out benchmarks/results/runtime_memory
    python benchmarks/bench_runtime_memory.py /tmp/b3-6l/int8 --speed --skip-memory --batches 1,4 \
        --out benchmarks/results/runtime_speed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = {
    "single": {"single_decoder": True},
    "single-private": {"single_decoder": True, "share_weights": False},
    "split-shared": {"single_decoder": False},
    "split-private": {"single_decoder": False, "share_weights": False},
}
FASTEST_BEFORE = "split-private"


def model_bytes(folder: Path) -> int:
    """Bytes of the graphs and data files a runtime may load (what `pgexport inspect` sums)."""
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx.data")))


def child(folder: str, mode: str, threads: int, new_tokens: int) -> None:
    """One (folder, mode) measured in this process; prints its result line."""
    from benchmarks.common import current_rss_bytes, emit, peak_rss_bytes
    from pgexport.bundled import sample_image
    from pgexport.runtime.session import OnnxPaliGemma

    base = current_rss_bytes()
    rt = OnnxPaliGemma(folder, threads=threads, **MODES[mode])
    loaded = current_rss_bytes()
    text = rt.generate([sample_image()], ["caption en"], max_new_tokens=new_tokens)[0]
    emit({"baseline": base, "after_load": loaded, "after_generate": current_rss_bytes(), "peak": peak_rss_bytes(),
          "text": text})


def measure_memory(folders: list[Path], modes: list[str], threads: int, new_tokens: int) -> list[dict]:
    from benchmarks.common import progress, run_child

    rows = []
    for folder in folders:
        size = model_bytes(folder)
        texts = {}
        for mode in modes:
            progress(f"{folder.name} {mode}: load + generate in a fresh process")
            cmd = [sys.executable, __file__, "--child", str(folder), mode, "--threads", str(threads),
                   "--new-tokens", str(new_tokens)]
            c = run_child(cmd, echo=False)
            if not c.ok:
                raise SystemExit(f"{folder.name} {mode}: {c.failure()}")
            r = c.result
            texts[mode] = r["text"]
            rows.append({"folder": folder.name, "mode": mode, "model_bytes": size, **{k: r[k] for k in
                         ("baseline", "after_load", "after_generate", "peak")},
                         "load_ratio": (r["after_load"] - r["baseline"]) / size,
                         "generate_ratio": (r["after_generate"] - r["baseline"]) / size,
                         "peak_ratio": (r["peak"] - r["baseline"]) / size})
            progress(f"  +{(r['after_generate'] - r['baseline']) / 2**30:.2f} GiB after generate = "
                     f"{rows[-1]['generate_ratio']:.2f}x the folder's {size / 2**30:.2f} GiB")
        if len(set(texts.values())) != 1:
            raise SystemExit(f"{folder.name}: the modes generate different text: {texts}")
    return rows


def measure_speed(folders: list[Path], modes: list[str], threads: int, batches: list[int], repeats: int,
                  decode_repeats: int | None = None) -> list[dict]:
    import numpy as np

    from benchmarks.common import interleaved, progress
    from pgexport.bundled import sample_image
    from pgexport.runtime.session import OnnxPaliGemma

    rows = []
    for folder in folders:
        models = {mode: OnnxPaliGemma(folder, threads=threads, **MODES[mode]) for mode in modes}
        processor = next(iter(models.values())).processor
        for batch in batches:
            inputs = processor(images=[sample_image()] * batch, prompts=["caption en"] * batch)
            ids, mask, pix = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
            features = next(iter(models.values())).encode_image(pix)  # the vision session is the same in every mode
            seq, room = ids.shape[1], 16
            state = {}
            for mode, rt in models.items():  # a past to decode from, per mode, as `generate` holds it
                logits, past = rt.prefill(ids, features, mask)
                tokens = np.asarray(logits).argmax(-1)[:, None]
                if rt.single_decoder:  # buffers for the prompt + `room` tokens, written in place
                    buffer_mask = np.zeros((batch, seq + room), np.int64)
                    buffer_mask[:, :seq], buffer_mask[:, seq] = mask, 1
                    state[mode] = (tokens, buffer_mask, rt.new_cache(batch, seq + room, start=past))
                else:
                    state[mode] = (tokens, np.concatenate([mask, np.ones((batch, 1), np.int64)], 1), past)

            def prefill(rt=None):
                return lambda: rt.prefill(ids, features, mask)[0]

            def decode(rt=None, mode=None):
                tokens, m, past = state[mode]
                if rt.single_decoder:
                    return lambda: rt.decode_in_place(tokens, m, past, seq)
                return lambda: rt.decode(tokens, m, past)[0]

            for step, make in (("prefill", lambda rt, mode: prefill(rt)), ("decode", lambda rt, mode: decode(rt, mode))):
                n = decode_repeats if step == "decode" and decode_repeats else repeats  # a decode step is short
                runs = interleaved({mode: make(rt, mode) for mode, rt in models.items()}, repeats=n, warmup=1,
                                   label=f"{folder.name} batch {batch} {step}", keep_results=False)
                base = runs[FASTEST_BEFORE].stats.median if FASTEST_BEFORE in runs else None
                for mode, r in runs.items():
                    rows.append({"folder": folder.name, "batch": batch, "step": step, "mode": mode,
                                 "median_ms": r.stats.median * 1e3, "ratio_to_fastest_before": r.stats.median / base if base else None})
                progress(f"{folder.name} batch {batch} {step}: " + ", ".join(
                    f"{mode} {r.stats.median * 1e3:.1f} ms" for mode, r in runs.items()))
        del models
    return rows


def render(result: dict, command: str) -> str:
    from benchmarks.common import markdown_table

    lines = ["# OnnxPaliGemma: weights held once", "", f"`{command}`", "",
             "Memory: (RSS - RSS after importing the runtime) / the folder's graph + data bytes, one fresh "
             "process per row, batch-1 `generate` of the bundled sample.", ""]
    if result["memory"]:
        rows = [[r["folder"], r["mode"], f"{r['model_bytes'] / 2**30:.2f}", f"{(r['after_load'] - r['baseline']) / 2**30:.2f}",
                 f"{(r['after_generate'] - r['baseline']) / 2**30:.2f}", f"{r['load_ratio']:.2f}",
                 f"{r['generate_ratio']:.2f}", f"{r['peak_ratio']:.2f}"] for r in result["memory"]]
        lines += [markdown_table(["folder", "mode", "folder GiB", "+RSS load GiB", "+RSS generate GiB", "load x",
                                  "generate x", "peak x"], rows), ""]
    if result["speed"]:
        lines += ["Speed: modes loaded in one process, interleaved; median ms; ratio to `split-private` "
                  "(the fastest mode before the single decoder).", ""]
        rows = [[r["folder"], r["batch"], r["step"], r["mode"], f"{r['median_ms']:.1f}",
                 "" if r["ratio_to_fastest_before"] is None else f"{r['ratio_to_fastest_before']:.3f}"] for r in result["speed"]]
        lines += [markdown_table(["folder", "batch", "step", "mode", "median ms", "x split-private"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", help="export folders (pgexport onnx) that hold decoder.onnx")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--speed", action="store_true", help="also time prefill and decode, modes interleaved")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--decode-repeats", type=int, default=None, help="decode steps timed per mode (default: --repeats)")
    ap.add_argument("--out", default="benchmarks/results/runtime_memory")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.threads, args.new_tokens)
        return 0
    from benchmarks.common import command_line, export_folders, machine_info, save_results

    folders = export_folders(ap, args.folders, "decoder.onnx")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes names from: {', '.join(MODES)}")
    result = {"machine": machine_info(), "command": command_line(Path(__file__).name, argv), "threads": args.threads,
              "memory": [] if args.skip_memory else measure_memory(folders, modes, args.threads, args.new_tokens),
              "speed": measure_speed(folders, modes, args.threads, [int(b) for b in args.batches.split(",")],
                                     args.repeats, args.decode_repeats) if args.speed else []}
    save_results(args.out, result, render(result, result["command"]), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
