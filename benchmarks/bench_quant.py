"""CPU speed and size of the int8 / int4 backends against fp32 (random weights, fixed geometry).

    python benchmarks/bench_quant.py                 # writes benchmarks/results/quant_cpu.json
    python benchmarks/bench_quant.py --threads 4 --skip-onnx

Geometry ("medium", ~25 M parameters, far smaller than 3B so that it runs in a minute on a laptop):
SigLIP 256 wide / MLP 1024 / 2 layers at 112 px (64 image tokens), Gemma 512 wide / MLP 2048 /
4 layers / 8 heads / 1 KV head of 64, vocabulary 16384. Batch 1 (and 4 for ONNX decode), a prompt
of 64 image + 8 text tokens; times are the best of a few runs (prefill) and the median of 8 decode
steps, in milliseconds, one intra-op thread unless --threads (PyTorch: median over interleaved rounds).

Backends: eager PyTorch fp32 vs optimum-quanto int8 / int4 (`pgexport quantize`), and ONNX
Runtime fp32 vs `pgexport onnx --quant int8` (DynamicQuantizeMatMul and MatMulNBits formats)
and `--quant int4` (accuracy_level 4 and 0), each loaded with the runtime's default
share_weights=True.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pgexport.models import PaliGemma, PaliGemmaConfig
from pgexport.models.config import TextConfig, VisionConfig

RESULTS = Path(__file__).parent / "results" / "quant_cpu.json"


def medium_config() -> PaliGemmaConfig:
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                          image_size=112, patch_size=14)
    text = TextConfig(model_type="gemma", vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=16384 - 64)


def inputs(cfg, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids = np.full((batch, n + 8), 300, np.int64)
    ids[:, :n] = cfg.image_token_id
    pixels = rng.uniform(-1, 1, (batch, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, np.ones_like(ids), pixels


def time_stepper(stepper, ids, mask, pixels, steps: int = 8, repeats: int = 3) -> dict:
    prefill = []
    for _ in range(repeats):
        t = time.perf_counter()
        stepper.prefill(ids, mask, pixels, steps + 1)
        prefill.append(time.perf_counter() - t)
    decode = []
    token = np.full(len(ids), 301, np.int64)
    for _ in range(steps):
        t = time.perf_counter()
        stepper.decode(token)
        decode.append(time.perf_counter() - t)
    return {"prefill_ms": round(min(prefill) * 1e3, 2), "decode_ms": round(statistics.median(decode) * 1e3, 3)}


def bench_torch(model, cfg) -> dict:
    from pgexport.models.generate import EagerStepper

    ids, mask, pixels = inputs(cfg, 1)
    time_stepper(EagerStepper(model), ids, mask, pixels, steps=2, repeats=1)  # warm-up
    return time_stepper(EagerStepper(model), ids, mask, pixels)


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(".json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the PyTorch variants (median)")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = medium_config()
    results = {"geometry": "SigLIP 256/1024/2 layers at 112 px; Gemma 512/2048/4 layers, 8 heads, 1 KV head x 64; vocab 16384",
               "params": None, "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "torch": {}, "onnx": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        model = PaliGemma.random(cfg, seed=0, std=0.04)
        results["params"] = sum(p.numel() for p in model.parameters())
        if not args.skip_torch:
            from pgexport.quanto_backend import load_quantized, quantize_checkpoint

            models = {"fp32": model}
            sizes = {"fp32": sum(p.numel() * p.element_size() for p in model.parameters())}
            for quant in ("int8", "int4"):
                folder = quantize_checkpoint(PaliGemma.random(cfg, seed=0, std=0.04), work / f"quanto-{quant}", quant=quant)
                models[f"quanto-{quant}"] = load_quantized(folder)
                sizes[f"quanto-{quant}"] = (folder / "quantized_model.safetensors").stat().st_size
            runs: dict[str, list[dict]] = {name: [] for name in models}
            for _ in range(args.rounds):  # interleaved, so that load changes hit every variant alike
                for name, m in models.items():
                    runs[name].append(bench_torch(m, cfg))
            for name, r in runs.items():
                entry = {k: round(statistics.median(x[k] for x in r), 3) for k in r[0]}
                entry["weights_bytes"] = sizes[name]
                results["torch"][name] = entry
                print("torch", name, entry, flush=True)
        if not args.skip_onnx:
            from pgexport.exporters.pipeline import export_folder
            from pgexport.exporters.quantize import QuantOptions, folder_model_bytes, quantize_folder
            from pgexport.manifest import read_manifest, write_manifest
            from pgexport.processor import PaliGemmaProcessor
            from pgexport.runtime import OnnxPaliGemma
            from pgexport.tokenizer import build_paligemma_tokenizer

            processor = PaliGemmaProcessor(build_paligemma_tokenizer(cfg.image_token_id - 1152),
                                           image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens)
            base = work / "fp32"
            export_folder(model, base, progress=None, validate=False, processor=processor, ort_fusions=False)
            variants = {"fp32": None, "int8-dynamic": QuantOptions.create("int8", int8_format="dynamic"),
                        "int8-nbits": QuantOptions.create("int8", int8_format="nbits"),
                        "int4": QuantOptions.create("int4"), "int4-accuracy0": QuantOptions.create("int4", accuracy_level=0)}
            for name, options in variants.items():
                folder = base
                if options is not None:
                    folder = work / name
                    shutil.copytree(base, folder)
                    info = quantize_folder(folder, options)
                    manifest = read_manifest(folder)
                    manifest.quantization = {k: v for k, v in info.items() if not k.startswith("bytes_")}
                    write_manifest(folder, manifest)
                rt = OnnxPaliGemma(folder, threads=args.threads)
                entry = {"bytes": folder_model_bytes(folder)}
                for batch in (1, 4):
                    ids, mask, pixels = inputs(cfg, batch)
                    time_stepper(rt.stepper(), ids, mask, pixels, steps=2, repeats=1)
                    t = time_stepper(rt.stepper(), ids, mask, pixels)
                    entry[f"b{batch}"] = t
                rt.close()
                results["onnx"][name] = entry
                print("onnx", name, entry, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
