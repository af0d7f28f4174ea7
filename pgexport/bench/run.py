"""`pgexport bench`: latency, memory and accuracy of every backend, on the user's model and machine.

    >>> from pgexport.bench.run import run_bench
    >>> report = run_bench("path/to/checkpoint", backends=["torch", "onnx-int8"], out="bench-report")  # doctest: +SKIP
    >>> report["recommendation"]["backend"]  # doctest: +SKIP
    'onnx-int8'

The model: a checkpoint folder (or preset name) is the fp32 PyTorch reference, and every other
backend is prepared from it into a cache folder (`--cache`, default
`~/.cache/pgexport/bench/<model digest>/<backend>`), reused on the next run: ONNX exports by
`exporters/pipeline.export_folder`, quanto folders by `quanto_backend.quantize_checkpoint`. An
export folder (holding `pgexport.json`) is measured as it is (`--backends` does not apply); its
accuracy is measured against the fp32 checkpoint given as `reference` (`--reference`).

Each backend runs in a process of its own (`pgexport/bench_worker.py` says what is timed), one
after the other, the reference first. The report (`report.json`, `report.md`, PNG plots) is
written by `pgexport/bench_report.py`, which also compares two reports (`--compare`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime

from pgexport.bench.measure import machine_info
from pgexport.bench.report import write_report
from pgexport.bench.worker import PROGRESS
from pgexport.bundled import default_model
from pgexport.errors import PgExportError
from pgexport.files import cache_dir
from pgexport.runtime.manifest import MANIFEST_FILE, read_manifest
from pgexport.train.dataset import random_scene, read_jsonl, render, scene_tasks

BACKENDS = ("torch", "torch-int8", "torch-int4", "onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int4")
DEFAULT_BACKENDS = ("torch", "torch-int8", "onnx-fp32", "onnx-int8", "onnx-int4")
REFERENCE = "torch"  # fp32 eager PyTorch: what every accuracy figure is measured against
DEFAULT_TASKS = ("caption", "detect", "color", "count", "position")  # synthetic inputs' prompts, in turn


def parse_backends(text: str | None) -> list[str]:
    """"torch,onnx-int8" -> ["torch", "onnx-int8"]; unknown names fail with the list of known ones."""
    names = [b.strip().lower() for b in (text or ",".join(DEFAULT_BACKENDS)).split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise PgExportError(f"unknown backend {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
    if not names:
        raise PgExportError("--backends is empty; name at least one of " + ", ".join(BACKENDS))
    return list(dict.fromkeys(names))


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files a backend loads (a checkpoint's or an export's folder, recursively)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


def model_digest(folder: Path) -> str:
    """Identity of a checkpoint for the cache: config + weight files' names, sizes and mtimes."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def default_cache() -> Path:
    return cache_dir("bench")


def prepare(model_dir: Path, backend: str, cache: Path, progress: Callable[[str], None], provider: str = "cpu") -> Path:
    """The folder `backend` loads: the checkpoint itself for "torch", else a cached variant
    (created on the first run, atomically, then reused). int8/int4 exports for CUDA are their own
    variants (`--target cuda`: MatMulNBits, which the CUDA provider runs; the CPU int8 export uses
    DynamicQuantizeMatMul, which ONNX Runtime runs on the CPU only)."""
    if backend == "torch":
        return model_dir
    cuda_quant = provider == "cuda" and backend in ("onnx-int8", "onnx-int4")
    target = cache / (backend + ("-cuda" if cuda_quant else ""))
    done = target / (MANIFEST_FILE if backend.startswith("onnx") else "config.json")
    if done.is_file():
        progress(f"{backend}: reusing {target}")
        return target
    kind, _, quant = backend.partition("-")
    progress(f"{backend}: preparing {target} (first run; reused afterwards)")
    # The eager side (torch) is imported only when a variant must be made: an export folder is
    # measured without it.
    if kind == "onnx":
        from pgexport.exporters.pipeline import export_folder

        # No export validation: the bench measures every variant's accuracy itself (and at 3B the
        # validation would hold the fp32 eager model beside the sessions).
        export_folder(str(model_dir), target, quant=quant, progress=lambda m: progress(f"  {m}"), overwrite=True,
                      validate=False, quant_options={"target": "cuda"} if cuda_quant else None)
    else:
        from pgexport.eager.quanto import quantize_checkpoint

        quantize_checkpoint(str(model_dir), target, quant=quant, overwrite=True, progress=lambda m: progress(f"  {m}"))
    return target


def bench_inputs(images: int, records: list | None, work: Path) -> list[dict]:
    """The inputs every backend is measured on: `images` (image, prompt) pairs, taken evenly
    over the labelled `records` when given (fewer if they hold fewer), else synthetic shapes
    scenes (pgexport.train.dataset) with the dataset's caption, detection and question prompts
    in turn."""
    if records:
        # evenly spread over the file, so that the prompts mix its tasks (a dataset lists each
        # image's tasks together)
        picks = sorted(set(np.linspace(0, len(records) - 1, min(images, len(records))).round().astype(int)))
        return [{"image": records[i].image, "prompt": records[i].prefix} for i in picks]
    rng = np.random.default_rng(2024)
    out = []
    for i in range(images):
        work.mkdir(parents=True, exist_ok=True)
        path = (work / f"input_{i}.png").resolve()
        scene = random_scene(rng)
        render(scene).save(path)
        # a caption, a question or a detection prompt in turn, each one that fits the scene
        tasks = {}
        for task, prefix, _ in scene_tasks(scene, rng):
            tasks.setdefault(task, prefix)  # the first detect prompt: a shape the scene holds
        kind = DEFAULT_TASKS[i % len(DEFAULT_TASKS)]
        out.append({"image": str(path), "prompt": tasks.get(kind, tasks["caption"])})
    return out


def _check_cuda(backends) -> None:
    """Fail before any export when --provider cuda cannot run here."""
    names = parse_backends(",".join(backends) if isinstance(backends, (list, tuple)) else backends)
    if any(b.startswith("onnx") for b in names):
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise PgExportError("--provider cuda: this onnxruntime has no CUDAExecutionProvider; install "
                                "onnxruntime-gpu, or leave the onnx-* backends out, or use --provider cpu")
    import torch  # the fp32 reference always runs

    if not torch.cuda.is_available():
        raise PgExportError("--provider cuda: PyTorch sees no CUDA device; use --provider cpu")


def _run_worker(spec: dict, work: Path, progress: Callable[[str], None]) -> dict:
    name = spec["backend"]
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.Popen([sys.executable, "-m", "pgexport.bench.worker", str(spec_path), str(result_path)],
                            env=env, stderr=subprocess.PIPE, text=True)
    other: list[str] = []
    for line in proc.stderr:  # live progress; the rest is kept for the log
        if line.startswith(PROGRESS):
            progress("  " + line[len(PROGRESS):].rstrip())
        elif line.strip():
            other.append(line.rstrip())
    proc.wait()
    if proc.returncode != 0 or not result_path.is_file():
        log = Path(spec["log"])
        log.write_text("\n".join(other) + "\n")
        raise PgExportError(f"backend {name} failed: {other[-1].strip() if other else 'no output'}"
                            f" (exit status {proc.returncode}; the worker's output is in {log})")
    return json.loads(result_path.read_text())


def run_bench(model: str | os.PathLike | None = None, backends: list[str] | None = None, provider: str = "cpu",
              threads: int | None = None, images: int = 8, new_tokens: int = 16, repeats: int = 3,
              data: str | None = None, examples: int = 200, out: str | os.PathLike = "bench-report",
              cache: str | os.PathLike | None = None, reference: str | os.PathLike | None = None, plots: bool = True,
              progress: Callable[[str], None] = print) -> dict:
    """Measure `backends` on `model` and write `out/report.{json,md}` and plots; returns the report.

    `images` inputs x `repeats` timed passes per backend (after a warm-up pass), `new_tokens`
    tokens each. `data`: a labelled JSONL (`pgexport dataset`) for task accuracy, scored on its
    first `examples` records. `reference`: the fp32 checkpoint an export folder is compared with.
    """
    from pgexport.eager.loading import init_checkpoint, is_folder_spec, not_found
    from pgexport.models.config import PRESETS

    if images < 1 or new_tokens < 2 or repeats < 1:
        raise PgExportError("--images and --repeats must be >= 1 and --new-tokens >= 2")
    if provider not in ("cpu", "cuda"):
        raise PgExportError(f"unknown --provider {provider!r}; use cpu or cuda")
    if provider == "cuda":
        _check_cuda(backends)
    records = None
    if data is not None:
        records = read_jsonl(data)  # a missing or malformed file fails here, before any variant is prepared
    spec_model = str(model or default_model())
    cache = Path(cache) if cache else default_cache()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if is_folder_spec(spec_model):
        folder = Path(spec_model)
    elif spec_model not in PRESETS:
        raise not_found(spec_model)
    else:  # a preset name: random weights, written once into the cache
        folder = cache / "presets" / spec_model
        if not (folder / "config.json").is_file():
            init_checkpoint(spec_model, folder, progress=lambda m: None)
        notes.append(f"{spec_model} is a preset with random weights: latency is meaningful, task accuracy is not")

    is_export = (folder / MANIFEST_FILE).is_file()
    if is_export:
        m = read_manifest(folder)
        q = m.quantization
        plan = {f"onnx-{'int%d' % q['bits'] if isinstance(q, dict) else ('fp16' if m.dtype == 'float16' else 'fp32')}": folder}
        if reference is not None:
            if not (Path(reference) / "config.json").is_file():
                raise PgExportError(f"--reference {reference} is not a checkpoint folder (no config.json)")
            plan = {REFERENCE: Path(reference), **plan}
        else:
            notes.append("an export folder was measured without --reference CHECKPOINT: no accuracy against fp32 PyTorch")
    else:
        chosen = parse_backends(",".join(backends) if isinstance(backends, (list, tuple)) else backends)
        cache = cache / model_digest(folder)
        plan = {}
        for b in [REFERENCE] + [b for b in chosen if b != REFERENCE]:  # the reference runs first
            plan[b] = prepare(folder, b, cache, progress, provider)
        if REFERENCE not in chosen:
            notes.append("torch fp32 ran as the accuracy reference although it was not requested")
    processor_dir = folder
    if provider == "cuda" and any(b.startswith("onnx") for b in plan):
        notes.append("peak GPU memory is measured for PyTorch only (torch.cuda.max_memory_allocated); ONNX Runtime "
                     "exposes no per-session peak")

    machine = machine_info()  # at the start: memory available and load before the bench's own
    work = Path(tempfile.mkdtemp(prefix=".bench-", dir=out))
    try:
        inputs = bench_inputs(images, records, out / "inputs")
        results, ref_logits = {}, None
        for i, (name, path) in enumerate(plan.items(), 1):
            progress(f"[{i}/{len(plan)}] {name}: measuring ({images} inputs x {repeats} passes, {new_tokens} tokens)")
            spec = {"backend": name, "path": str(path), "processor": str(processor_dir), "provider": provider,
                    "threads": threads, "inputs": inputs, "new_tokens": new_tokens, "repeats": repeats,
                    "reference": ref_logits, "data": data, "examples": examples, "progress": True,
                    "log": str(out / f"{name}.worker.log")}
            if name == REFERENCE:
                spec["logits_out"] = str(work / "reference.npz")
            r = _run_worker(spec, work, progress)
            r["size_bytes"] = folder_bytes(path)
            if name == REFERENCE:
                ref_logits = spec["logits_out"]
            results[name] = r
            progress(f"[{i}/{len(plan)}] {name}: prefill {r['prefill_s']['median'] * 1e3:.1f} ms, "
                     f"decode {r['decode_s']['median'] * 1e3:.2f} ms/token"
                     + (f", top-1 {r['accuracy']['top1_agreement']:.3f}" if r.get("accuracy") else ""))
        if len(inputs) < images:
            notes.append(f"--data holds {len(inputs)} records: {len(inputs)} inputs were measured, not {images}")
        settings = {"model": str(folder), "provider": provider, "threads": threads, "images": len(inputs),
                    "new_tokens": new_tokens, "repeats": repeats, "data": data, "examples": examples if data else None,
                    "inputs": inputs, "cache": str(cache)}
        report = write_report(out, results, settings, notes, plots=plots, progress=progress, machine=machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
