"""CPU speed and size of the int8 / int4 backends against fp32 (random weights, fixed geometry).

    python benchmarks/bench_quant.py                 # writes benchmarks/results/quant_cpu.json
    python benchmarks/bench_quant.py --threads 4 --skip-onnx

Geometry ("medium", ~25 M parameters, far smaller than 3B so that it runs quickly on a laptop):
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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import quantized_copy, random_inputs  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.models.config import TextConfig, VisionConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant_cpu.json"
TEXT_TOKENS = 8  # after the image tokens


def medium_config() -> PaliGemmaConfig:
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                          image_size=112, patch_size=14)
    text = TextConfig(model_type="gemma", vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=16384 - 64)


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


def timed_after_warmup(new_stepper, cfg, batch: int) -> dict:
    """`time_stepper` on a fresh stepper, after a short untimed pass on another."""
    ids, mask, pixels = random_inputs(cfg, TEXT_TOKENS, seed=0, batch=batch)
    time_stepper(new_stepper(), ids, mask, pixels, steps=2, repeats=1)
    return time_stepper(new_stepper(), ids, mask, pixels)


def bench_torch(model, cfg, work: Path, rounds: int) -> dict:
    """Eager fp32 and quanto int8 / int4, interleaved over `rounds` rounds (medians)."""
    from pgexport.eager.generate import EagerStepper
    from pgexport.eager.quanto import load_quantized, quantize_checkpoint

    models = {"fp32": model}
    sizes = {"fp32": sum(p.numel() * p.element_size() for p in model.parameters())}
    for quant in ("int8", "int4"):
        folder = quantize_checkpoint(PaliGemma.random(cfg, seed=0, std=0.04), work / f"quanto-{quant}", quant=quant)
        models[f"quanto-{quant}"] = load_quantized(folder)
        sizes[f"quanto-{quant}"] = (folder / "quantized_model.safetensors").stat().st_size
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):  # interleaved, so that load changes hit every variant alike
        for name, m in models.items():
            runs[name].append(timed_after_warmup(lambda m=m: EagerStepper(m), cfg, 1))
    out = {}
    for name, r in runs.items():
        entry = {k: round(statistics.median(x[k] for x in r), 3) for k in r[0]}
        entry["weights_bytes"] = sizes[name]
        out[name] = entry
        print("torch", name, entry, flush=True)
    return out


def bench_onnx(model, cfg, work: Path, threads: int) -> dict:
    """The fp32 export and its quantized copies through the runtime, batch 1 and 4."""
    from pgexport.exporters.pipeline import export_folder
    from pgexport.exporters.quantize import QuantOptions, folder_model_bytes
    from pgexport.processing.processor import PaliGemmaProcessor
    from pgexport.processing.tokenizer import build_paligemma_tokenizer
    from pgexport.runtime import OnnxPaliGemma

    processor = PaliGemmaProcessor(build_paligemma_tokenizer(cfg.image_token_id - 1152),
                                   image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens)
    base = work / "fp32"
    export_folder(model, base, progress=None, validate=False, processor=processor, ort_fusions=False)
    variants = {"fp32": None, "int8-dynamic": QuantOptions.create("int8", int8_format="dynamic"),
                "int8-nbits": QuantOptions.create("int8", int8_format="nbits"),
                "int4": QuantOptions.create("int4"), "int4-accuracy0": QuantOptions.create("int4", accuracy_level=0)}
    out = {}
    for name, options in variants.items():
        folder = base if options is None else quantized_copy(base, work / name, options)
        rt = OnnxPaliGemma(folder, threads=threads)
        entry = {"bytes": folder_model_bytes(folder)}
        for batch in (1, 4):
            entry[f"b{batch}"] = timed_after_warmup(rt.stepper, cfg, batch)
        rt.close()
        out[name] = entry
        print("onnx", name, entry, flush=True)
    return out


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
            results["torch"] = bench_torch(model, cfg, work, args.rounds)
        if not args.skip_onnx:
            results["onnx"] = bench_onnx(model, cfg, work, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
