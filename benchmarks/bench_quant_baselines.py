"""int8 / int4 against stock baselines at the `paligemma-3b-pt-224` geometry, one run.

Random weights (`pgexport init`'s checkpoint, or `--checkpoint DIR`), batch 1, CPU. Measured:

* backends, each in a fresh process through the `pgexport.bench.worker` protocol (spec JSON ->
  result JSON: load, vision encoder, prefill = time to the first token's logits with the vision
  encoder included, per-token decode, RSS after load, peak RSS; plus the folder's size on disk):
  ONNX Runtime fp32 / int8 / int4 (`pgexport.runtime.OnnxPaliGemma`), optimum-quanto int8 / int4
  (`pgexport quantize`), our eager fp32 model, and transformers' `PaliGemmaForConditionalGeneration`
  in fp32 (given our checkpoint's tensors by `benchmarks.common.transformers_sharing`: strict load,
  tied head mapped explicitly; timed by `benchmarks.common.HFRunner`, as `bench_eager.py` does).
  Same input everywhere: the pgexport processor on one synthetic scene (`pgexport.train.dataset`)
  with its caption prompt.
* quantization jobs, each in a fresh process: wall time and peak RSS (VmHWM of that process), and
  the ratio to the fp32 weight bytes. Ours: `export_folder(checkpoint, quant=int8|int4)` (the fp32
  trace streamed from the checkpoint, then `exporters/quantize.py`; the phases are timed apart) and
  `pgexport.eager.quanto.quantize_checkpoint`; the baselines' below.
* baseline (a): ONNX Runtime's stock `onnxruntime.quantization.quantize_dynamic` (weight_type
  QInt8, `--baseline-op-types`, default MatMul) applied to our plain fp32 export's three graphs,
  written to a new folder with the manifest and tokenizer (so `OnnxPaliGemma` runs it; the manifest
  marks it as quantized so that ONNX Runtime keeps its weight prepacking, as it does for ours).
  quantize_dynamic loads each graph with its weights and holds several times their bytes in
  private memory (QDYN_FACTOR estimates how many), so it runs at a reduced decoder depth
  (`--baseline-layers`, default 6): a checkpoint holding the first N decoder layers is written
  (safetensors, `pgexport.models.checkpoint`), and our int8 is exported from that same
  checkpoint, so the ratio compares like with like. A memory guard skips (and says so) a baseline
  job whose estimated peak exceeds MemAvailable (`--no-memory-guard`).
* baseline (b), with `onnxruntime_genai`: its model builder's int4 CPU build
  (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`, stock options) of the same Gemma
  decoder weights, written as a `GemmaForCausalLM` folder from our checkpoint; prefill of a text
  prompt as long as ours (image tokens + prompt; no vision encoder) and per-token decode with the
  `onnxruntime_genai` Generator API (`append_tokens`, one token per decode step). Our int4 is
  compared with it at the same decoder depth: full depth when the builder's estimated memory
  (GENAI_BUILD_FACTOR x the decoder's fp32 bytes) fits, else `--baseline-layers` (`--genai-depth`).
  The script installs nothing by itself: without onnxruntime-genai it stops and says so, unless
  `--install-missing` (pip-install it) or `--no-install-genai` (leave baseline (b) out).

    python benchmarks/bench_quant_baselines.py --checkpoint /tmp/pgexport-bench-load/paligemma-3b-pt-224-float32
    python benchmarks/bench_quant_baselines.py --preset paligemma-tiny --baseline-layers 1 --repeats 2 \\
        --new-tokens 4 --work /tmp/bqb --out /tmp/bqb/result

Writes `--out`.json and `--out`.md (default benchmarks/results/quant_baselines). Everything that is
prepared goes to `--work` and is reused by the next run where reuse does not hide a measurement:
the checkpoint, the fp32 exports, the reduced checkpoint and the GemmaForCausalLM folder are
reused; the quantization jobs run again (they are measured) unless `--reuse-variants`. Our int4
uses the exporter's defaults unless `--int4-block-size N` (its folders are named `onnx-int4-bN`,
so another block size is never reused by mistake).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import set_omp_wait_policy  # noqa: E402

if __name__ == "__main__":  # before torch loads its OpenMP runtime (children inherit the environment)
    set_omp_wait_policy(sys.argv[1:])

from benchmarks.common import (  # noqa: E402
    HFRunner, Stats, emit, fmt_stats_ms, gib, init_command, machine_info, machine_markdown, markdown_table,
    meminfo_bytes, peak_rss_bytes, processed, progress, ratio, reduce_depth, reduced_config, reset_peak_rss,
    run_child, run_worker, save_results, scene_input, share_clock, transformers_sharing, usable_cores, within_depth,
)
from pgexport.bench.run import folder_bytes  # noqa: E402
from pgexport.exporters.quantize import DEFAULT_BLOCK_SIZE, check_block_size  # noqa: E402
from pgexport.files import move_into_place, staging_folder  # noqa: E402

DEFAULT_INT4_BLOCK = DEFAULT_BLOCK_SIZE[4]

PARTS = ("transformers", "torch", "onnx-fp32", "onnx-int8", "onnx-int4", "torch-int8", "torch-int4",
         "baseline-a", "baseline-b")
HF, GENAI = "transformers", "onnxruntime-genai-int4"  # backends run by this script's worker
QDYN = "onnx-quantize-dynamic-int8"  # baseline (a)'s backend: an export folder, run by the worker's ONNX path
LABELS = {
    "transformers": "transformers eager fp32", "torch": "ours eager fp32",
    "onnx-fp32": "ORT fp32 (ours)", "onnx-int8": "ORT int8 (ours)", "onnx-int4": "ORT int4 (ours)",
    "torch-int8": "quanto int8 (ours)", "torch-int4": "quanto int4 (ours)",
    QDYN: "ORT int8, stock quantize_dynamic (baseline a)", GENAI: "onnxruntime-genai int4 (baseline b)",
}
# The quantization targets (stated for paligemma-3b-pt-224).
TARGET_QUANT_PEAK = 1.5  # peak RSS of quantizing / fp32 weight bytes
TARGET_A_PREFILL, TARGET_A_DECODE = 1.0, 0.9  # ours int8 / quantize_dynamic int8
TARGET_B_DECODE = 0.9  # ours int4 / onnxruntime-genai int4, per token
TARGET_INT4_PREFILL = 1.2  # ours int4 prefill / ours int8 prefill
# Memory estimates for the guards, fitted to the baselines' peak RSS on small models (bench runs of
# this script): a fixed base plus a factor times the fp32 bytes the tool reads.
GENAI_BUILD_FACTOR, GENAI_BUILD_BASE = 2.5, 0.5 * 2**30  # builder peak ~ base + factor x decoder fp32 bytes
QDYN_FACTOR, QDYN_BASE = 4.0, 0.25 * 2**30  # quantize_dynamic peak ~ base + factor x the decoder graph's fp32 data bytes
AUX_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "preprocessor_config.json")


def _safetensors_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _decoder_bytes(checkpoint, layers: int | None = None) -> int:
    """fp32 bytes of the Gemma decoder's tensors (embedding included) of the first `layers` layers,
    read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    from pgexport.models.checkpoint import to_internal_name, weight_files

    total = 0
    for path in weight_files(checkpoint):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                name = to_internal_name(key)
                if name.startswith("language_model.") and within_depth(name, layers):
                    total += math.prod(f.get_slice(key).get_shape()) * 4
    return total


def _copy_files(src: Path, dst: Path, names) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# =========================================================================== children
class _Phases:
    """A progress callback that splits a job into phases at given message prefixes: each phase's
    wall time and peak RSS (the kernel's high-water mark is reset at every boundary)."""

    def __init__(self, boundaries: dict[str, str], first: str):
        self.boundaries, self.current = dict(boundaries), first
        self.t0 = time.perf_counter()
        self.phases: dict[str, dict] = {}
        self.resettable = reset_peak_rss()

    def __call__(self, msg: str) -> None:
        progress(f"  {msg}")
        for prefix, name in list(self.boundaries.items()):
            if msg.startswith(prefix):
                self.close()
                self.current = name
                del self.boundaries[prefix]
                break

    def close(self) -> None:
        now = time.perf_counter()
        self.phases[self.current] = {"seconds": now - self.t0, "peak_rss": peak_rss_bytes()}
        self.t0 = now
        if self.resettable:
            reset_peak_rss()

    def result(self) -> dict:
        self.close()
        return {"phases": self.phases, "peak_rss": max(p["peak_rss"] for p in self.phases.values()),
                "peak_reset_per_phase": self.resettable}


def job_export(spec: dict) -> dict:
    """export_folder(checkpoint) with quant fp32 / int8 / int4; phases: trace (fp32 export) and
    quantize (exporters/quantize.py, int8/int4 only)."""
    from pgexport.exporters.pipeline import export_folder

    phases = _Phases({"quantizing ": "quantize", "writing the tokenizer": "finish"}, "export")
    t = time.perf_counter()
    res = export_folder(spec["src"], spec["out"], quant=spec["quant"], validate=spec.get("validate", False),
                        overwrite=True, progress=phases, quant_options=spec.get("quant_options"))
    seconds = time.perf_counter() - t
    q = res.get("quantization") or {}
    return {"seconds": seconds, **phases.result(), "total_bytes": res["total_bytes"],
            "quant_bytes_before": q.get("bytes_before"), "quant_bytes_after": q.get("bytes_after"),
            "validation": (res["report"] or {}).get("passed") if spec.get("validate") else None}


def job_quanto(spec: dict) -> dict:
    from pgexport.eager.quanto import quantize_checkpoint

    phases = _Phases({"quantizing the linear layers": "quantize + save"}, "load")
    t = time.perf_counter()
    quantize_checkpoint(spec["src"], spec["out"], quant=spec["quant"], overwrite=True, progress=phases)
    return {"seconds": time.perf_counter() - t, **phases.result()}


def job_reduce(spec: dict) -> dict:
    """A checkpoint with the first `layers` decoder layers of `src` (same tensors, safetensors)."""
    from pgexport.models.checkpoint import load_checkpoint, save_checkpoint

    src, out = Path(spec["src"]), Path(spec["out"])
    t = time.perf_counter()
    reset_peak_rss()
    model = reduce_depth(load_checkpoint(src), spec["layers"])  # memory-mapped, nothing copied
    tmp = staging_folder(out)
    try:
        save_checkpoint(model, tmp, max_shard_bytes=2 << 30)
        _copy_files(src, tmp, AUX_FILES)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}


def job_quantize_dynamic(spec: dict) -> dict:
    """Baseline (a): onnxruntime.quantization.quantize_dynamic on each graph of an fp32 export."""
    from pgexport.runtime.manifest import read_manifest, write_manifest

    src, out = Path(spec["src"]), Path(spec["out"])
    op_types = spec["op_types"]  # None: ORT's default (every op of its IntegerOps registry)
    manifest = read_manifest(src)
    tmp = staging_folder(out)
    t = time.perf_counter()
    try:
        names = {key: manifest.graphs[key] for key in ("vision_encoder", "prefill", "decode")}
        graphs, resettable = quantize_graphs(src, tmp, names, op_types, spec.get("per_channel", False))
        seconds = time.perf_counter() - t
        _copy_files(src, tmp, ("config.json", *AUX_FILES))
        # The manifest marks the folder as weight-quantized: pgexport.runtime then keeps ONNX
        # Runtime's prepacking on (as plain ORT does), which its int8 kernels need to be fast.
        manifest.quantization = {
            "method": "onnxruntime.quantization.quantize_dynamic (stock, baseline)", "bits": 8,
            "weight_type": "QInt8", "activation_type": "QUInt8 (dynamic)", "per_channel": spec.get("per_channel", False),
            "op_types_to_quantize": op_types or "ORT default (IntegerOps registry)",
            "onnxruntime_version": __import__("onnxruntime").__version__,
        }
        manifest.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "pgexport.json"}
        write_manifest(tmp, manifest)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for f in src.glob("*-inferred.onnx"):  # quantize_dynamic's shape-inference copy, if it was interrupted
            f.unlink(missing_ok=True)
    return {"seconds": seconds, "peak_rss": max(g["peak_rss"] for g in graphs.values()), "graphs": graphs,
            "peak_reset_per_graph": resettable}


def quantize_graphs(src: Path, tmp: Path, names: dict[str, str], op_types, per_channel: bool) -> tuple[dict, bool]:
    """quantize_dynamic (QInt8) of the graphs `names` (key -> file) of `src` into `tmp`: per key
    the time, peak RSS (reset between graphs where the kernel allows), what the graph holds, bytes
    in and out; and whether the peak could be reset."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graphs = {}
    resettable = reset_peak_rss()
    for key, name in names.items():
        progress(f"  quantize_dynamic {name} (QInt8, op types {op_types or 'ORT default'})")
        t0 = time.perf_counter()
        # Stock call; each graph gets its own external data file `<graph>.data` (prefill and
        # decode no longer share one: their weights are stored twice on disk).
        quantize_dynamic(src / name, tmp / name, op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                         per_channel=per_channel, use_external_data_format=True)
        graphs[key] = {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), **_graph_summary(tmp / name),
                       "input_bytes": sum(p.stat().st_size for p in src.iterdir() if p.is_file()
                                          and p.name.endswith(".data") and (key != "vision_encoder") == ("decoder" in p.name)),
                       "output_bytes": (tmp / name).stat().st_size + sum(p.stat().st_size for p in tmp.glob(f"{name}*.data"))}
        progress(f"  {name}: {graphs[key]['seconds']:.1f}s, peak RSS {gib(graphs[key]['peak_rss']):.2f} GiB")
        if resettable:
            reset_peak_rss()
    return graphs, resettable


def _graph_summary(path: Path) -> dict:
    """What a quantized graph holds: its op counts, the bytes of its initializers per data type, and
    the float matrices left in it (the largest first)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        op = f"{n.domain + '.' if n.domain and n.domain != 'ai.onnx' else ''}{n.op_type}"
        ops[op] = ops.get(op, 0) + 1
    by_type: dict[str, int] = {}
    floats = []
    for t in proto.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        nbytes = math.prod(t.dims) * dtype.itemsize
        by_type[str(dtype)] = by_type.get(str(dtype), 0) + nbytes
        if dtype.kind == "f" and len(t.dims) >= 2:
            floats.append((nbytes, t.name, list(t.dims)))
    floats.sort(reverse=True)
    keep = ("MatMulInteger", "DynamicQuantizeLinear", "MatMul", "Gemm", "Gather", "Conv", "ConvInteger",
            "com.microsoft.DynamicQuantizeMatMul", "com.microsoft.MatMulIntegerToFloat")
    return {"ops": {k: v for k, v in sorted(ops.items()) if k in keep},
            "initializer_bytes": by_type, "float_matrices": [{"name": n, "shape": d, "bytes": b} for b, n, d in floats[:5]],
            "float_matrix_bytes": sum(b for b, _, _ in floats)}


def gemma_config(cfg) -> dict:
    """The `config.json` of a GemmaForCausalLM (Gemma2ForCausalLM) with the PaliGemma decoder's geometry."""
    hf = cfg.to_hf_dict()
    text = {k: v for k, v in hf["text_config"].items() if k != "num_image_tokens"}
    arch = "Gemma2ForCausalLM" if cfg.text.is_gemma2 else "GemmaForCausalLM"
    text.update(architectures=[arch], bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id, tie_word_embeddings=True, dtype="float32", torch_dtype="float32",
                hidden_act=cfg.text.hidden_act)
    return text


def job_gemma_folder(spec: dict) -> dict:
    """Baseline (b)'s input: the decoder's tensors under transformers' Gemma names (`model.*`; the
    head is tied to `model.embed_tokens.weight`, so no `lm_head.weight` is stored, as
    `save_pretrained` does), config.json, tokenizer. Streamed shard by shard (<= 2 GiB in memory)."""
    from pgexport.models.checkpoint import read_config

    src, out = Path(spec["src"]), Path(spec["out"])
    layers = spec.get("layers")
    cfg = read_config(src)
    if layers is not None:
        cfg = reduced_config(cfg, layers)
    tmp = staging_folder(out)
    t0 = time.perf_counter()
    reset_peak_rss()
    try:
        total = write_gemma_shards(src, tmp, layers)
        (tmp / "config.json").write_text(json.dumps(gemma_config(cfg), indent=2) + "\n")
        _copy_files(src, tmp, ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"))
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "weight_bytes": total}


def write_gemma_shards(src: Path, tmp: Path, layers: int | None, shard_bytes: int = 2 << 30) -> int:
    """The decoder's tensors of checkpoint `src` (first `layers` layers) as `model.*` safetensors
    shards of at most `shard_bytes` in `tmp`, with their index. Returns the bytes written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pgexport.models.checkpoint import to_internal_name, weight_files

    shards: list[str] = []
    weight_map: dict[str, str] = {}
    pending: dict = {}
    size = total = 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"part-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in pending})
            pending, size = {}, 0

    for path in weight_files(src):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = to_internal_name(key)
                if not name.startswith("language_model.") or name.endswith("lm_head.weight") or not within_depth(name, layers):
                    continue
                tensor = f.get_tensor(key)
                nbytes = tensor.numel() * tensor.element_size()
                if pending and size + nbytes > shard_bytes:
                    flush()
                pending["model." + name[len("language_model."):]] = tensor
                size += nbytes
                total += nbytes
    flush()
    final = {}
    for i, name in enumerate(shards):  # the usual names, now that the count is known
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / name, tmp / new)
        final[name] = new
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=2))
    return total


JOBS = {"export": job_export, "quanto": job_quanto, "reduce": job_reduce, "quantize_dynamic": job_quantize_dynamic,
        "gemma_folder": job_gemma_folder}


# --------------------------------------------------------------------------- worker backends
def _load_transformers(spec: dict):
    """transformers' PaliGemmaForConditionalGeneration holding our checkpoint's tensors."""
    import torch

    import pgexport

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    ours = pgexport.load_model(spec["path"], dtype="float32")  # memory-mapped
    hf = transformers_sharing(ours, spec.get("hf_attn", "sdpa"))  # strict load, tied head mapped, tensors shared

    class Stepper:
        def prefill(self, ids, mask, px, n_new):
            self.runner = HFRunner(hf, ids, mask, px)
            with torch.inference_mode():
                self.runner.prefill(n_new)
            return self.runner.logits.float().numpy()

        def decode(self, tokens):
            with torch.inference_mode():
                self.runner.decode(int(tokens[0]))
            return self.runner.logits.float().numpy()

    def encode(px):  # what HFRunner.vision times: SigLIP + projector
        with torch.inference_mode():
            return hf.get_image_features(torch.as_tensor(px)).pooler_output

    return Stepper, encode, None, {"attn_implementation": spec.get("hf_attn", "sdpa"),
                                    "transformers": __import__("transformers").__version__}


def _load_genai(spec: dict):
    """onnxruntime-genai's Generator over the builder's folder: prefill = append_tokens(prompt),
    decode = append_tokens([token]) (each runs the model; get_logits reads the result)."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec["path"])
    if spec.get("threads"):
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    model = og.Model(config)
    image_id, filler = spec["image_token_id"], spec["filler_token_id"]

    def last_logits(gen):
        logits = np.asarray(gen.get_logits(), np.float32)
        return logits.reshape(logits.shape[0], -1, logits.shape[-1])[:, -1]

    setup_ms = []  # creating a Generator (its state and KV buffers): per request, like our stepper(), not timed

    class Stepper:
        def __init__(self):
            t = time.perf_counter()
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=spec["max_length"], do_sample=False)
            self.gen = og.Generator(model, params)
            setup_ms.append((time.perf_counter() - t) * 1e3)

        def prefill(self, ids, mask, px, n_new):
            ids = np.asarray(ids)
            text = np.where(ids == image_id, filler, ids).astype(np.int32)  # a text prompt of the same length
            self.gen.append_tokens(text)
            return last_logits(self.gen)

        def decode(self, tokens):
            self.gen.append_tokens(np.asarray(tokens, np.int32).reshape(1, -1))
            return last_logits(self.gen)

    return Stepper, (lambda px: None), None, {"onnxruntime_genai": og.__version__, "vision": "none (text-only decoder)",
                                              "generator_setup_ms": setup_ms}


def worker_main(argv: list[str]) -> int:
    """`pgexport.bench.worker` (same spec and result), with two more backends: transformers and
    onnxruntime-genai."""
    from pgexport.bench import worker

    def load(spec):
        if spec["backend"] == HF:
            return _load_transformers(spec)
        if spec["backend"] == GENAI:
            return _load_genai(spec)
        return worker.load_backend(spec)

    return worker.main(argv, load=load)


# =========================================================================== parent
class Bench:
    """The run's state: starts the jobs and workers (one process each), keeps what they report,
    and prepares (or reuses) the folders the backends run from."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.jobs: dict[str, dict] = {}
        self.backends: dict[str, dict] = {}
        self.folders: dict[tuple, Path | None] = {}
        self.int4_block = args.int4_block_size or DEFAULT_INT4_BLOCK
        self.int4_name = f"onnx-int4-b{self.int4_block}"  # per block size: another block size's folder is never reused
        (work / ".specs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ jobs
    def job(self, name: str, kind: str, spec: dict, what: str, input_bytes: int | None = None) -> dict:
        """Run a job of this script (`--job KIND`) in a fresh process; its result or {"error"}."""
        path = self.work / ".specs" / f"{name}.job.json"
        path.write_text(json.dumps(spec, indent=2))
        progress(f"job {name}: {what}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", kind, str(path)]
        return self.record_job(name, kind, what, cmd, input_bytes, spec.get("out"))

    def record_job(self, name, kind, what, cmd, input_bytes, out, log: Path | None = None) -> dict:
        """Run `cmd` (its output shown, or written to `log` for a chatty external tool), sampling its
        memory; record its result, wall time, peak RSS and the machine's load around it."""
        c = run_child(cmd, log=log, sample_memory=True)
        entry: dict[str, Any] = {"kind": kind, "what": what, "process_wall_s": c.wall_s, "ru_maxrss": c.peak_rss, **c.sampled,
                                 "load_avg_before": c.load_avg_before[0], "load_avg_after": c.load_avg_after[0],
                                 "input_fp32_bytes": input_bytes}
        result = c.result
        if log is not None and c.code == 0 and result is None:  # an external tool (the genai builder)
            result = {"seconds": c.wall_s, "peak_rss": c.peak_rss}
        if c.code != 0 or result is None:
            entry["error"] = c.failure(3)
            progress(f"job {name} FAILED: {entry['error']}")
        else:
            entry.update(result)
            if out and Path(out).exists():
                entry["output_bytes"] = folder_bytes(out)
            progress(f"job {name}: {entry['seconds']:.1f}s, peak RSS {gib(entry['peak_rss']):.2f} GiB"
                     + (f" ({entry['peak_rss'] / input_bytes:.2f}x the fp32 weights)" if input_bytes else ""))
        self.jobs[name] = entry
        return entry

    def external_job(self, name: str, cmd: list[str], what: str, input_bytes: int | None, out: Path) -> dict:
        log = self.work / ".specs" / f"{name}.log"
        progress(f"job {name}: {what} (log: {log})")
        return self.record_job(name, "external", what, cmd, input_bytes, out, log=log)

    def reused(self, name: str, what: str, path: Path) -> None:
        self.jobs[name] = {"kind": "reused", "what": what, "reused": str(path), "output_bytes": folder_bytes(path)}
        progress(f"job {name}: reusing {path}")

    def prepared(self, name: str, out: Path, reuse: bool, reused_what: str, kind: str, spec: dict, what: str,
                 input_bytes: int | None = None) -> Path | None:
        """`out`: reused as it is when `reuse`, else written by the job `kind` (None if it failed)."""
        if reuse:
            self.reused(name, reused_what, out)
            return out
        return None if "error" in self.job(name, kind, spec, what, input_bytes) else out

    def measure(self, name: str, backend: str, path: Path, processor: Path, depth: int, extra: dict | None = None) -> dict:
        """Measure one backend in a fresh worker process (the `pgexport.bench.worker` protocol; this
        script's own worker for transformers and onnxruntime-genai)."""
        a = self.args
        spec = {"backend": backend, "path": str(path), "processor": str(processor), "provider": "cpu",
                "threads": a.threads, "inputs": self.inputs, "new_tokens": a.new_tokens, "repeats": a.repeats,
                "reference": None, "progress": True, **(extra or {})}
        own = [sys.executable, str(Path(__file__).resolve()), "--worker"] if backend in (HF, GENAI) else None
        progress(f"measure {name} ({LABELS.get(backend, backend)}, {depth} decoder layers): {path}")
        c, r = run_worker(spec, self.work / ".specs" / f"{name}.spec.json", self.work / ".specs" / f"{name}.result.json",
                          own, sample_memory=True)
        entry: dict[str, Any] = {"backend": backend, "label": LABELS.get(backend, backend), "depth": depth,
                                 "path": str(path), "load_avg_before": c.load_avg_before[0],
                                 "load_avg_after": c.load_avg_after[0], **c.sampled}
        if r is None:
            entry["error"] = c.failure(1)
            progress(f"measure {name} FAILED: {entry['error']}")
        else:
            entry.update(r)
            entry["label"] = LABELS.get(backend, backend)
            entry["size_bytes"] = folder_bytes(path)
            entry["ru_maxrss"] = c.peak_rss
            if backend == GENAI:
                entry["vision_s"] = None  # text-only: nothing to time
            progress(f"measure {name}: prefill {entry['prefill_s']['median'] * 1e3:.1f} ms, decode "
                     f"{entry['decode_s']['median'] * 1e3:.2f} ms/token, peak RSS {gib(entry['peak_rss_bytes']):.2f} GiB")
        self.backends[name] = entry
        return entry

    # ------------------------------------------------------------------ folders
    def prepare_checkpoint(self) -> None:
        """The fp32 checkpoint (--checkpoint, or written by pgexport init), its depth, the input."""
        from pgexport.models.checkpoint import read_config
        from pgexport.models.config import PaliGemmaConfig

        args, work = self.args, self.work
        if args.checkpoint:
            checkpoint = Path(args.checkpoint).resolve()
            if not (checkpoint / "config.json").is_file():
                raise SystemExit(f"--checkpoint {checkpoint} holds no config.json")
            self.reused("checkpoint", "the fp32 checkpoint (--checkpoint)", checkpoint)
        else:
            checkpoint = work / f"{args.preset}-float32"
            if (checkpoint / "config.json").is_file():
                self.reused("checkpoint", f"the fp32 checkpoint of {args.preset} (random weights)", checkpoint)
            else:
                try:
                    PaliGemmaConfig.from_preset(args.preset)
                except KeyError as e:
                    raise SystemExit(str(e).strip('"')) from None
                e = self.record_job("checkpoint", "init", f"pgexport init --preset {args.preset} (random weights)",
                                    init_command(args.preset, checkpoint), None, str(checkpoint),
                                    log=work / ".specs" / "checkpoint.log")
                if "error" in e:
                    raise SystemExit(f"could not write the checkpoint: {e['error']}")
        self.checkpoint = checkpoint
        self.cfg = read_config(checkpoint)
        self.L = self.cfg.text.num_hidden_layers
        self.N = min(args.baseline_layers, self.L)
        self.fp32_bytes = _safetensors_bytes(checkpoint)
        self.inputs = [scene_input(work / "inputs")]  # one synthetic scene + its caption prompt
        self.prompt_len = int(processed(checkpoint, self.inputs[0])["input_ids"].shape[1])
        progress(f"checkpoint {checkpoint}: {self.L} decoder layers, {gib(self.fp32_bytes):.2f} GiB of fp32 weights; "
                 f"prompt {self.prompt_len} tokens; {gib(shutil.disk_usage(work).free):.1f} GiB free in {work}")

    def ckpt_at(self, depth: int) -> Path | None:
        """The checkpoint's first `depth` decoder layers (the checkpoint itself at full depth)."""
        if depth == self.L:
            return self.checkpoint
        from pgexport.models.checkpoint import read_config

        key = ("ckpt", depth)
        if key not in self.folders:
            out = self.work / f"{self.checkpoint.name}-L{depth}"
            done = (out / "config.json").is_file() and read_config(out).text.num_hidden_layers == depth
            self.folders[key] = self.prepared(
                f"checkpoint-L{depth}", out, done, f"the first {depth} decoder layers of the checkpoint",
                "reduce", {"src": str(self.checkpoint), "out": str(out), "layers": depth},
                f"checkpoint with the first {depth} of {self.L} decoder layers (safetensors)")
        return self.folders[key]

    def onnx_at(self, depth: int, quant: str) -> Path | None:
        """Our ONNX export of the `depth`-layer checkpoint (given, reused or exported now)."""
        key = ("onnx", depth, quant)
        if key not in self.folders:
            self.folders[key] = self._export(depth, quant)
        return self.folders[key]

    def _export(self, depth: int, quant: str) -> Path | None:
        args = self.args
        src = self.ckpt_at(depth)
        if src is None:
            return None
        name = (self.int4_name if quant == "int4" else f"onnx-{quant}") + ("" if depth == self.L else f"-L{depth}")
        out = self.work / name
        given = args.fp32_export if depth == self.L else args.baseline_fp32_export if depth == self.N else None
        if quant == "fp32" and given:
            from pgexport.runtime.manifest import read_manifest

            out = Path(given).resolve()
            if read_manifest(out).num_layers != depth:
                raise SystemExit(f"{out} holds {read_manifest(out).num_layers} decoder layers, not {depth}")
            self.reused(name, f"the {depth}-layer fp32 export (--{'fp32-export' if depth == self.L else 'baseline-fp32-export'})", out)
            return out
        done = (out / "pgexport.json").is_file() and (quant == "fp32" or args.reuse_variants)
        what = (f"export_folder({src.name}, quant={quant}): fp32 trace + " + ("int8 DynamicQuantizeMatMul" if quant == "int8" else
                f"int4 MatMulNBits (block {self.int4_block})") if quant != "fp32" else f"export_folder({src.name}, quant=fp32)")
        options = {"block_size": self.int4_block} if quant == "int4" else None
        return self.prepared(name, out, done, f"ORT {quant} export of the {depth}-layer checkpoint", "export",
                             {"src": str(src), "out": str(out), "quant": quant, "validate": args.validate,
                              "quant_options": options}, what, input_bytes=_safetensors_bytes(src))

    def quanto(self, quant: str) -> Path | None:
        name = f"torch-{quant}"
        out = self.work / name
        return self.prepared(name, out, self.args.reuse_variants and (out / "quantization_map.json").is_file(),
                             f"quanto {quant} folder", "quanto", {"src": str(self.checkpoint), "out": str(out), "quant": quant},
                             f"pgexport.eager.quanto.quantize_checkpoint(quant={quant})", input_bytes=self.fp32_bytes)


def genai_imports() -> bool:
    """Whether onnxruntime_genai imports (in a fresh interpreter)."""
    return subprocess.run([sys.executable, "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0


def genai_available(install: bool) -> tuple[bool, str]:
    """Whether onnxruntime_genai imports; with `install` (--install-missing), try
    `pip install onnxruntime-genai` first when it does not, without changing the installed
    onnxruntime."""
    if genai_imports():
        return True, "installed"
    if not install:
        return False, "not installed (onnxruntime_genai does not import; --no-install-genai)"
    progress("onnxruntime_genai does not import: checking whether `pip install onnxruntime-genai` keeps onnxruntime")
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "onnxruntime-genai"], capture_output=True, text=True)
    if dry.returncode != 0:
        return False, "not installed (pip install --dry-run onnxruntime-genai failed)"
    would = " ".join(line for line in dry.stdout.splitlines() if line.startswith("Would install"))
    changes_ort = any(tok.startswith("onnxruntime-") and not tok.startswith("onnxruntime-genai")
                      or tok.startswith("onnxruntime_") for tok in would.split()[2:])
    cmd = [sys.executable, "-m", "pip", "install", "onnxruntime-genai"] + (["--no-deps"] if changes_ort else [])
    progress(f"installing: {' '.join(cmd[2:])}" + (" (it would change onnxruntime otherwise)" if changes_ort else ""))
    subprocess.run(cmd, capture_output=True)
    if genai_imports():
        return True, "installed by this run" + (" with --no-deps" if changes_ort else "")
    return False, "not installed (pip install onnxruntime-genai did not give an importable module)"


def _stats(d: dict | None) -> Stats | None:
    return Stats(**{k: v for k, v in d.items() if k != "samples"}) if d else None


def _ms(d: dict | None, digits: int = 1) -> str:
    s = _stats(d)
    return "n/a" if s is None or not s.n else fmt_stats_ms(s, digits)


def _ok(b: dict | None) -> bool:
    return bool(b) and "error" not in b


def _block_size(text: str) -> int:
    try:
        return check_block_size(int(text))
    except Exception as e:  # ValueError from int(), PgExportError from the check
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Parts (for --skip): " + ", ".join(PARTS))
    ap.add_argument("--preset", default="paligemma-3b-pt-224", help="geometry of the random checkpoint written when --checkpoint is not given")
    ap.add_argument("--checkpoint", default=None, help="an existing fp32 checkpoint folder (default: WORK/PRESET-float32, written by pgexport init if missing)")
    ap.add_argument("--work", default="/tmp/pgexport-bench-quant", help="checkpoints, exports and quantized folders (reused between runs)")
    ap.add_argument("--fp32-export", default=None, help="an existing full-depth fp32 export of --checkpoint to reuse (default: WORK/onnx-fp32)")
    ap.add_argument("--baseline-fp32-export", default=None,
                    help="an existing fp32 export of the first --baseline-layers decoder layers of --checkpoint, for quantize_dynamic (default: exported into WORK)")
    ap.add_argument("--baseline-layers", type=int, default=6,
                    help="decoder depth of the baseline (a) comparison, and of (b) when the builder cannot take the full depth (default 6; capped at the model's depth)")
    ap.add_argument("--baseline-op-types", default="MatMul", help="quantize_dynamic's op_types_to_quantize, comma-separated, or 'all' (ORT's default registry)")
    ap.add_argument("--baseline-per-channel", action="store_true", help="quantize_dynamic per_channel=True (stock default: False)")
    ap.add_argument("--genai-depth", default="auto", choices=["auto", "full", "reduced"],
                    help="decoder depth of baseline (b): full, reduced (--baseline-layers), auto = full when its estimated memory fits")
    ap.add_argument("--genai-option", action="append", default=[], metavar="KEY=VALUE", help="extra_options for the genai builder (default: none, stock)")
    install = ap.add_mutually_exclusive_group()
    install.add_argument("--install-missing", action="store_true",
                         help="pip install onnxruntime-genai (baseline b) when it is missing; without this flag nothing is installed")
    install.add_argument("--no-install-genai", action="store_true",
                         help="when onnxruntime-genai is missing, leave baseline (b) out (and say so) instead of stopping")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per backend, after one warm-up pass")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per pass: the first from prefill, the others decoded")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention implementation")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: " + ", ".join(PARTS))
    ap.add_argument("--int4-block-size", type=_block_size, default=None,
                    help="block size of our int4 exports (default: the exporter's, %d; WORK/onnx-int4-bN[-LK] per size)" % DEFAULT_INT4_BLOCK)
    ap.add_argument("--reuse-variants", action="store_true", help="reuse quantized folders already in WORK (their quantization is then not re-timed)")
    ap.add_argument("--validate", action="store_true", help="validate our exports against eager PyTorch (adds to the quantization jobs' time and memory)")
    ap.add_argument("--keep-genai-source", action="store_true", help="keep the GemmaForCausalLM folder after the build (default: removed, it is as large as the decoder)")
    ap.add_argument("--no-memory-guard", action="store_true", help="run the baselines' jobs even when their estimated memory exceeds MemAvailable")
    ap.add_argument("--omp-wait-policy", default=None, choices=["passive", "active", "default"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_baselines"))
    ap.add_argument("--job", default=None, choices=sorted(JOBS), help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    if args.worker:
        return worker_main(rest)
    if args.job:
        spec = json.loads(Path(rest[0]).read_text())
        result = JOBS[args.job](spec)
        result.setdefault("peak_rss", peak_rss_bytes())
        emit(result)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"unknown part(s) in --skip: {', '.join(sorted(skip - set(PARTS)))}; choose from {', '.join(PARTS)}")
    if args.repeats < 1 or args.new_tokens < 2 or args.baseline_layers < 1:
        ap.error("--repeats and --baseline-layers must be >= 1 and --new-tokens >= 2")
    want = [p for p in PARTS if p not in skip]
    if "baseline-b" in want and not (args.install_missing or args.no_install_genai) and not genai_imports():
        raise SystemExit("bench_quant_baselines.py: baseline (b) needs the package onnxruntime-genai, which is not installed; "
                         "install it, or pass --install-missing (pip-installs it), --no-install-genai or --skip baseline-b")
    return run(args, want)


def run(args, want: list[str]) -> int:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    share_clock()  # the children's progress lines use this process's clock
    info = machine_info(["onnxruntime-genai", "optimum-quanto", "onnxscript"])
    progress(f"machine: {info['cpu_model']}, {info['usable_cores']} cores, {info['mem_available_gib']} GiB available; parts: {', '.join(want)}")
    R = Bench(args, work)
    R.prepare_checkpoint()
    plan = main_plan(R, want)
    a_state = plan_baseline_a(R, want, plan) if "baseline-a" in want else {}
    b_state = plan_baseline_b(R, want, plan) if "baseline-b" in want else {}
    measure_plan(R, plan, a_state, b_state)
    comparisons = compare_backends(R, want, a_state, b_state)
    mem_total = meminfo_bytes("MemTotal")
    notes: list[str] = []
    is_3b = is_3b_geometry(R.cfg)
    if not is_3b:
        notes.append("this is not the paligemma-3b-pt-224 geometry: the targets are stated for 3B and are only indicative here")
    setup = {
        "preset": f"{R.checkpoint.name} (--checkpoint)" if args.checkpoint else args.preset, "checkpoint": str(R.checkpoint),
        "work": str(work), "decoder_layers": R.L,
        "vision_layers": R.cfg.vision.num_hidden_layers, "hidden_size": R.cfg.text.hidden_size, "vocab_size": R.cfg.text.vocab_size,
        "image_size": R.cfg.vision.image_size, "image_tokens": R.cfg.num_image_tokens, "prompt_tokens": R.prompt_len,
        "prompt": R.inputs[0]["prompt"], "fp32_weight_bytes": R.fp32_bytes, "threads": args.threads, "repeats": args.repeats,
        "new_tokens": args.new_tokens, "batch": 1, "provider": "cpu", "validate_exports": args.validate,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"), "hf_attn": args.hf_attn,
        "baseline_a": a_state, "baseline_b": b_state, "mem_total_bytes": mem_total, "geometry_is_3b": is_3b,
        "int4_block_size": R.int4_block,
    }
    results = {"benchmark": "quant_baselines", "command": "python benchmarks/bench_quant_baselines.py " + " ".join(sys.argv[1:]),
               "machine": info, "setup": setup, "jobs": R.jobs, "backends": R.backends, "comparisons": comparisons,
               "quantization_targets": quantization_targets(R.jobs, R.fp32_bytes, mem_total, R.int4_name), "notes": notes}
    save_results(args.out, results, render_markdown(results), echo=True)
    return 0


def is_3b_geometry(cfg) -> bool:
    from pgexport.models.config import PaliGemmaConfig

    ref = PaliGemmaConfig.from_preset("paligemma-3b-pt-224")

    def shape(c):
        return (c.text.hidden_size, c.text.intermediate_size, c.text.num_hidden_layers, c.text.vocab_size,
                c.vision.num_hidden_layers, c.vision.hidden_size, c.vision.image_size)

    return shape(cfg) == shape(ref)


def main_plan(R: Bench, want: list[str]) -> list[tuple]:
    """The backends of ours and transformers at full depth: (name, backend, folder, processor,
    depth, extra spec) each, their folders prepared."""
    L, checkpoint = R.L, R.checkpoint
    plan: list[tuple] = []
    if "transformers" in want:
        plan.append(("transformers", HF, checkpoint, checkpoint, L, {"hf_attn": R.args.hf_attn}))
    if "torch" in want:
        plan.append(("torch", "torch", checkpoint, checkpoint, L, None))
    for quant in ("fp32", "int8", "int4"):
        if f"onnx-{quant}" in want:
            plan.append((f"onnx-{quant}", f"onnx-{quant}", R.onnx_at(L, quant), checkpoint, L, None))
    for quant in ("int8", "int4"):
        if f"torch-{quant}" in want:
            plan.append((f"torch-{quant}", f"torch-{quant}", R.quanto(quant), checkpoint, L, None))
    return plan


def plan_baseline_a(R: Bench, want: list[str], plan: list[tuple]) -> dict[str, Any]:
    """Baseline (a): stock quantize_dynamic vs our int8, both at depth N. Prepares both folders
    (unless the memory guard says no) and adds their backends to `plan`; returns its state."""
    args, L, N, work = R.args, R.L, R.N, R.work
    state: dict[str, Any] = {"depth": N, "op_types": args.baseline_op_types, "per_channel": args.baseline_per_channel}
    fp32_n = R.onnx_at(N, "fp32")
    ours_n = R.onnx_at(N, "int8")
    qdyn_out = work / ("quantize-dynamic-int8" + ("" if N == L else f"-L{N}"))
    qdyn = None
    if fp32_n is not None:
        from pgexport.runtime.manifest import read_manifest

        graph_bytes = max(sum(p.stat().st_size for p in fp32_n.glob("*.data") if p.name.startswith("decoder")),
                          sum(p.stat().st_size for p in fp32_n.glob("vision*.data")))
        estimate = QDYN_BASE + QDYN_FACTOR * graph_bytes
        available = meminfo_bytes("MemAvailable")
        state["estimated_peak_bytes"] = estimate
        if args.reuse_variants and (qdyn_out / "pgexport.json").is_file():
            R.reused("quantize-dynamic", "stock quantize_dynamic folder", qdyn_out)
            qdyn = qdyn_out
        elif estimate > available and not args.no_memory_guard:
            state["skipped"] = (f"quantize_dynamic would need ~{gib(estimate):.1f} GiB ({QDYN_FACTOR}x the "
                                f"{gib(graph_bytes):.1f} GiB decoder graph), {gib(available):.1f} GiB available; "
                                "use a smaller --baseline-layers or --no-memory-guard")
            progress(f"baseline (a) skipped: {state['skipped']}")
        else:
            op_types = None if args.baseline_op_types.strip().lower() == "all" else \
                [o.strip() for o in args.baseline_op_types.split(",") if o.strip()]
            e = R.job("quantize-dynamic", "quantize_dynamic",
                      {"src": str(fp32_n), "out": str(qdyn_out), "op_types": op_types, "per_channel": args.baseline_per_channel},
                      f"onnxruntime.quantization.quantize_dynamic(QInt8, op types {args.baseline_op_types}) on the "
                      f"{read_manifest(fp32_n).num_layers}-layer fp32 export", input_bytes=_safetensors_bytes(R.ckpt_at(N)))
            qdyn = None if "error" in e else qdyn_out
    state.update(ours=f"onnx-int8@L{N}" if N != L else "onnx-int8", baseline=f"{QDYN}@L{N}" if N != L else QDYN)
    if ours_n is not None and N != L:
        plan.append((state["ours"], "onnx-int8", ours_n, R.ckpt_at(N), N, None))
    elif ours_n is not None and "onnx-int8" not in want:
        plan.append(("onnx-int8", "onnx-int8", ours_n, R.checkpoint, L, None))
    if qdyn is not None:
        plan.append((state["baseline"], QDYN, qdyn, R.ckpt_at(N), N, None))
    return state


def plan_baseline_b(R: Bench, want: list[str], plan: list[tuple]) -> dict[str, Any]:
    """Baseline (b): onnxruntime-genai's int4 build vs our int4 at the same depth (full when the
    builder's estimated memory fits, see --genai-depth). Adds both backends to `plan`."""
    args, L, N, checkpoint = R.args, R.L, R.N, R.checkpoint
    state: dict[str, Any] = {}
    ok, how = genai_available(args.install_missing)
    state["onnxruntime_genai"] = how
    if not ok:
        state["skipped"] = how
        progress(f"baseline (b) skipped: onnxruntime-genai {how}")
        return state
    full_dec = _decoder_bytes(checkpoint)
    est_full = GENAI_BUILD_BASE + GENAI_BUILD_FACTOR * full_dec
    available = meminfo_bytes("MemAvailable")
    depth = L if args.genai_depth == "full" or (args.genai_depth == "auto" and est_full <= 0.9 * available) else N
    dec = _decoder_bytes(checkpoint, depth)
    estimate = GENAI_BUILD_BASE + GENAI_BUILD_FACTOR * dec
    state.update(depth=depth, decoder_fp32_bytes=dec, estimated_peak_bytes=estimate, full_depth_estimate_bytes=est_full)
    if depth != L:
        state["why_reduced"] = (f"the builder loads the decoder through transformers and holds ~{GENAI_BUILD_FACTOR}x its fp32 "
                                f"bytes: ~{gib(est_full):.1f} GiB at full depth, {gib(available):.1f} GiB available"
                                if args.genai_depth == "auto" else "--genai-depth reduced")
    ours_d = R.onnx_at(depth, "int4")
    state["ours"] = "onnx-int4" if depth == L else f"onnx-int4@L{depth}"
    state["baseline"] = GENAI if depth == L else f"{GENAI}@L{depth}"
    genai_out = R.work / ("genai-int4" + ("" if depth == L else f"-L{depth}"))
    genai = None
    if args.reuse_variants and (genai_out / "genai_config.json").is_file():
        R.reused("genai-build", "onnxruntime-genai int4 build", genai_out)
        genai = genai_out
    elif estimate > available and not args.no_memory_guard:
        state["skipped"] = (f"the builder would need ~{gib(estimate):.1f} GiB, {gib(available):.1f} GiB available; "
                            "use --genai-depth reduced / a smaller --baseline-layers, or --no-memory-guard")
        progress(f"baseline (b) skipped: {state['skipped']}")
    else:
        genai = build_genai(R, depth, dec, genai_out, state)
    if ours_d is not None and depth != L:
        plan.append((state["ours"], "onnx-int4", ours_d, R.ckpt_at(depth), depth, None))
    elif ours_d is not None and "onnx-int4" not in want:
        plan.append(("onnx-int4", "onnx-int4", ours_d, checkpoint, L, None))
    if genai is not None:
        image_id = R.cfg.image_token_id
        plan.append((state["baseline"], GENAI, genai, R.ckpt_at(depth) or checkpoint, depth,
                     {"image_token_id": image_id, "filler_token_id": (image_id - 1152) // 2,
                      "max_length": R.prompt_len + args.new_tokens + 1}))
    return state


def build_genai(R: Bench, depth: int, dec: int, genai_out: Path, state: dict) -> Path | None:
    """The GemmaForCausalLM folder of the first `depth` decoder layers (reused or written), then the
    genai builder's int4 CPU build of it into `genai_out`; None when a step failed."""
    args, work = R.args, R.work
    src = work / ("gemma-src" + ("" if depth == R.L else f"-L{depth}"))
    done = (src / "model.safetensors.index.json").is_file() and (src / "config.json").is_file() \
        and json.loads((src / "config.json").read_text())["num_hidden_layers"] == depth
    if R.prepared("gemma-folder", src, done, "GemmaForCausalLM folder", "gemma_folder",
                  {"src": str(R.checkpoint), "out": str(src), "layers": None if depth == R.L else depth},
                  f"GemmaForCausalLM folder (model.* names, tied head, config.json, tokenizer) of the first {depth} decoder layers") is None:
        return None
    tmp_out = work / f".{genai_out.name}.tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    cache = work / ".genai-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp_out),
           "-p", "int4", "-e", "cpu", "-c", str(cache)]
    if args.genai_option:
        cmd += ["--extra_options", *args.genai_option]
    state["builder_command"] = " ".join(Path(c).name if c == sys.executable else c for c in cmd)
    e = R.external_job("genai-build", cmd, "python -m onnxruntime_genai.models.builder -p int4 -e cpu "
                       f"({' '.join(args.genai_option) or 'stock options'})", dec, tmp_out)
    shutil.rmtree(cache, ignore_errors=True)
    genai = None
    if "error" not in e and (tmp_out / "genai_config.json").is_file():
        shutil.rmtree(genai_out, ignore_errors=True)
        os.replace(tmp_out, genai_out)
        R.jobs["genai-build"]["output_bytes"] = folder_bytes(genai_out)
        genai = genai_out
    else:
        shutil.rmtree(tmp_out, ignore_errors=True)
    if not args.keep_genai_source:
        shutil.rmtree(src, ignore_errors=True)
    return genai


def measure_plan(R: Bench, plan: list[tuple], a_state: dict, b_state: dict) -> None:
    """Measure every planned backend, one process each; each baseline right after its counterpart
    of ours, so that both see the same machine load."""
    for base_key, ours_key in ((a_state.get("baseline"), a_state.get("ours")), (b_state.get("baseline"), b_state.get("ours"))):
        names = [p[0] for p in plan]
        if base_key in names and ours_key in names:
            entry = plan.pop(names.index(base_key))
            plan.insert([p[0] for p in plan].index(ours_key) + 1, entry)
    progress(f"measuring {len(plan)} backends: {', '.join(p[0] for p in plan)}")
    for name, backend, folder, processor, depth, extra in plan:
        if folder is None:
            R.backends[name] = {"backend": backend, "label": LABELS.get(backend, backend), "depth": depth,
                                "error": "not prepared (its preparation job failed)"}
            continue
        R.measure(name, backend, folder, processor, depth, extra)


def compare_backends(R: Bench, want: list[str], a_state: dict, b_state: dict) -> list[dict]:
    """The ratios of ours to the baselines (and int4 to int8) against their targets."""
    B, N, L = R.backends, R.N, R.L
    comparisons: list[dict] = []

    def med(name: str, key: str) -> float | None:
        b = B.get(name)
        return b[key]["median"] if _ok(b) and b.get(key) else None

    def compare(label: str, ours: str, base: str, key: str, target: float | None, depth: int, how: str = "") -> None:
        a, b = med(ours, key), med(base, key)
        r = ratio(a, b) if a is not None and b is not None else None
        comparisons.append({"comparison": label, "ours": ours, "baseline": base, "metric": key, "depth": depth,
                            "ours_value": a, "baseline_value": b, "ratio": r, "target": target,
                            "met": (r <= target) if (r is not None and target is not None) else None, "how": how})

    if "baseline-a" in want:
        o, b = a_state.get("ours"), a_state.get("baseline")
        compare("(a) prefill: ours int8 / quantize_dynamic int8", o, b, "prefill_s", TARGET_A_PREFILL, N)
        compare("(a) decode per token: ours int8 / quantize_dynamic int8", o, b, "decode_s", TARGET_A_DECODE, N)
        compare("(a) vision encoder: ours int8 / quantize_dynamic int8", o, b, "vision_s", None, N)
    if "baseline-b" in want and b_state.get("ours"):
        d = b_state["depth"]
        compare("(b) decode per token: ours int4 / onnxruntime-genai int4", b_state["ours"], b_state["baseline"], "decode_s",
                TARGET_B_DECODE, d)
        # prefill: ours includes the vision encoder, genai's text-only prompt does not; informational
        o, g = B.get(b_state["ours"]), B.get(b_state["baseline"])
        if _ok(o) and _ok(g):
            dec_only = o["prefill_s"]["median"] - o["vision_s"]["median"]
            comparisons.append({"comparison": "(b) prefill, decoder only: (ours int4 prefill - its vision median) / genai prefill",
                                "ours": b_state["ours"], "baseline": b_state["baseline"], "metric": "prefill_s - vision_s",
                                "depth": d, "ours_value": dec_only, "baseline_value": g["prefill_s"]["median"],
                                "ratio": ratio(dec_only, g["prefill_s"]["median"]), "target": None, "met": None,
                                "how": "approximate: difference of medians"})
    if "onnx-int4" in B and "onnx-int8" in B:
        compare("int4 prefill / int8 prefill (ours, full depth)", "onnx-int4", "onnx-int8", "prefill_s", TARGET_INT4_PREFILL, L)
        compare("int4 decode / int8 decode (ours, full depth)", "onnx-int4", "onnx-int8", "decode_s", None, L)
    return comparisons


def quantization_targets(J: dict, fp32_bytes: int, mem_total: int, int4_job: str) -> list[dict]:
    """The peak-memory target of each full-depth quantization job that ran (not reused)."""
    out = []
    for name in ("onnx-int8", int4_job, "torch-int8", "torch-int4"):
        j = J.get(name)
        if j is None or j.get("kind") == "reused":
            continue
        if "error" in j:
            out.append({"job": name, "error": j["error"], "met": False})
            continue
        r = j["peak_rss"] / fp32_bytes
        out.append({"job": name, "peak_rss": j["peak_rss"], "fp32_bytes": fp32_bytes, "ratio": r,
                    "peak_rss_anon_sampled": j.get("peak_rss_anon_sampled"),
                    "fits_memory": j["peak_rss"] <= mem_total, "met": r <= TARGET_QUANT_PEAK and j["peak_rss"] <= mem_total})
    return out


# =========================================================================== report
def _g(nbytes) -> str:
    """A size with its unit: GiB from 1 GiB up, else MiB."""
    if nbytes is None:
        return "n/a"
    return f"{gib(nbytes):.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _verdict(met) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def render_markdown(res: dict) -> str:
    return "\n".join(header_lines(res) + backend_lines(res) + job_lines(res) + comparison_lines(res)
                     + ["", "## Machine", "", machine_markdown(res["machine"])])


def header_lines(res: dict) -> list[str]:
    s = res["setup"]
    a, b = s["baseline_a"], s["baseline_b"]
    L = s["decoder_layers"]
    lines = [
        "# Quantization vs stock baselines", "",
        f"`{res['command'].strip()}`", "",
        f"- model: `{s['preset']}` geometry" + ("" if s["geometry_is_3b"] else " (NOT the 3B geometry: targets indicative only)")
        + f", random weights from `{s['checkpoint']}`: {s['vision_layers']} vision layers, {L} decoder layers, hidden "
        f"{s['hidden_size']}, vocabulary {s['vocab_size']}; fp32 weights {_g(s['fp32_weight_bytes'])}",
        f"- input: batch 1, one synthetic scene at {s['image_size']} px + \"{s['prompt']}\" = {s['prompt_tokens']} tokens "
        f"({s['image_tokens']} image tokens); {s['new_tokens']} tokens per pass (1 from prefill, {s['new_tokens'] - 1} decode "
        f"steps, greedy), {s['repeats']} timed passes after one warm-up; {s['threads']} threads; CPU",
        f"- our int4: MatMulNBits, block size {s['int4_block_size']} (asymmetric, accuracy level 4); "
        "our int8: DynamicQuantizeMatMul (the CPU defaults)",
        "- each backend and each job ran in a fresh process, one after the other (`pgexport.bench.worker` protocol); "
        "medians (p10-p90) in ms. prefill = time to the first token's logits, vision encoder included (except baseline "
        "(b), a text-only decoder); decode = per token",
    ]
    if a.get("depth") is not None and a["depth"] < L:
        lines.append(f"- **baseline (a) at reduced depth: the first {a['depth']} of {L} decoder layers** (full vision encoder, "
                     f"full LM head). quantize_dynamic loads each graph with its weights and holds several times their bytes "
                     f"(estimated {QDYN_FACTOR}x), so the full decoder need not fit in memory; our int8 was exported from the "
                     f"same {a['depth']}-layer checkpoint, so the (a) ratios compare like with like")
    elif a.get("depth") is not None:
        lines.append(f"- baseline (a) at full depth ({L} decoder layers, --baseline-layers {a['depth']} >= the model's depth)")
    if b.get("depth"):
        where = "full depth" if b["depth"] == L else f"reduced depth: the first {b['depth']} of {L} decoder layers"
        lines.append(f"- baseline (b) at {where}" + (f" ({b['why_reduced']})" if b.get("why_reduced") else "")
                     + "; our int4 at the same depth")
    for n in res["notes"]:
        lines.append(f"- note: {n}")
    return lines


def backend_lines(res: dict) -> list[str]:
    rows = []
    for name, r in res["backends"].items():
        if not _ok(r):
            rows.append([name, r.get("label", ""), r.get("depth", ""), "-", "-", "-", "-", "-", "-", "-", f"FAILED: {r.get('error')}", "-"])
            continue
        rows.append([name, r["label"], r["depth"], _g(r["size_bytes"]), f"{r['load_s']:.1f}", _g(r["rss_after_load_bytes"]),
                     _g(r["peak_rss_bytes"]), _g(r.get("peak_rss_anon_sampled")),
                     _ms(r.get("vision_s")) if r.get("vision_s") else "n/a (text only)",
                     _ms(r["prefill_s"]), _ms(r["decode_s"], 2), f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "n/a"])
    return ["", "## Backends", "",
            markdown_table(["backend", "what", "decoder layers", "disk", "load s", "RSS after load", "peak RSS",
                            "peak private", "vision ms", "prefill ms", "decode ms/token", "tokens/s"], rows),
            "", "RSS counts the resident pages of memory-mapped weight files (ORT fp32 and the eager models map their "
            "files; quantized ORT sessions prepack their weights into private memory). peak private: the largest "
            "RssAnon seen (sampled every 0.1 s), i.e. without the mapped files' pages, which the kernel can drop.", ""]


def job_lines(res: dict) -> list[str]:
    s = res["setup"]
    fp32 = s["fp32_weight_bytes"]
    rows = []
    for name, j in res["jobs"].items():
        if j.get("kind") == "reused":
            rows.append([name, j["what"], "reused", "-", "-", "-", "-", "-", "-", _g(j.get("output_bytes"))])
            continue
        if "error" in j:
            rows.append([name, j["what"], "FAILED", "-", "-", "-", "-", "-", "-", j["error"][:120]])
            continue
        phases = j.get("phases") or j.get("graphs") or {}
        ph = "; ".join(f"{k} {v['seconds']:.1f}s / {_g(v['peak_rss'])}" for k, v in phases.items())
        inp = j.get("input_fp32_bytes")
        rows.append([name, j["what"], f"{j['seconds']:.1f}", f"{j['process_wall_s']:.1f}", ph or "-", _g(j["peak_rss"]),
                     _g(j.get("peak_rss_anon_sampled")), _g(inp), f"{j['peak_rss'] / inp:.2f}x" if inp else "-",
                     _g(j.get("output_bytes"))])
    lines = ["## Quantization and preparation jobs", "",
             markdown_table(["job", "what", "call s", "process s", "phases (s / peak RSS)", "peak RSS", "peak private",
                             "input fp32 weights", "peak / fp32", "output"], rows),
             "", "call s: the call itself; process s: the whole process (interpreter, imports). Peak RSS: the process's "
             "high-water mark (reset between phases, so each phase's is its own; the job's is the largest); it "
             "counts the resident pages of mapped files (the fp32 weights the job reads). peak private: the largest "
             "RssAnon sampled every 0.1 s (memory the job itself allocated). "
             "Reused folders were not re-timed (--reuse-variants or an existing fp32 export / checkpoint).", ""]
    qt = res["quantization_targets"]
    if qt:
        lines += [f"Target: quantizing fits in memory ({_g(s['mem_total_bytes'])} here) with peak RSS <= "
                  f"{TARGET_QUANT_PEAK}x the fp32 weight bytes ({_g(fp32)}):", ""]
        lines.append(markdown_table(["job", "peak RSS", "peak / fp32", "peak private / fp32", "fits", "target"], [
            [q["job"], _g(q.get("peak_rss")), f"{q['ratio']:.2f}x" if q.get("ratio") else "-",
             f"{q['peak_rss_anon_sampled'] / fp32:.2f}x" if q.get("peak_rss_anon_sampled") else "-",
             str(q.get("fits_memory", "-")), _verdict(q["met"]) if "error" not in q else f"FAILED: {q['error'][:80]}"]
            for q in qt]))
        lines.append("")
    return lines


def comparison_lines(res: dict) -> list[str]:
    s, J = res["setup"], res["jobs"]
    a, b = s["baseline_a"], s["baseline_b"]
    lines = ["## Baseline comparisons", ""]
    rows = []
    for c in res["comparisons"]:
        unit = (lambda v: "n/a" if v is None else f"{v * 1e3:.2f}")
        rows.append([c["comparison"], c["depth"], c["ours"], c["baseline"], unit(c["ours_value"]), unit(c["baseline_value"]),
                     "n/a" if c["ratio"] is None else f"{c['ratio']:.3f}", "-" if c["target"] is None else f"<= {c['target']}",
                     _verdict(c["met"]) if c["target"] is not None else (c["how"] or "info")])
    if rows:
        lines.append(markdown_table(["comparison", "decoder layers", "ours", "baseline", "ours ms", "baseline ms", "ratio",
                                     "target", "result"], rows))
    if a:
        lines += ["", f"Baseline (a): `onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, op_types_to_quantize="
                  f"{a.get('op_types')}, per_channel={a.get('per_channel', False)})` on our fp32 export's three graphs, "
                  "each written with its own data file (prefill and decode no longer share their weights on disk); loaded "
                  "through `pgexport.runtime.OnnxPaliGemma` with ONNX Runtime's prepacking on, like ours."
                  + (f" Skipped: {a['skipped']}." if a.get("skipped") else "")]
        lines += quantize_dynamic_lines(J.get("quantize-dynamic") or {})
    if b:
        lines += ["", "Baseline (b): " + (f"skipped: {b['skipped']}." if b.get("skipped") and not b.get("depth") else
                  f"onnxruntime-genai {b.get('onnxruntime_genai')}; `{b.get('builder_command', 'not run')}` on a GemmaForCausalLM "
                  "folder written from our checkpoint (the decoder's tensors under `model.*`, head tied to the embedding); "
                  "timed with `og.Generator`: prefill = `append_tokens` of a text prompt as long as ours (the `<image>` ids "
                  "replaced by an ordinary token), decode = `append_tokens` of one token, logits read with `get_logits`. "
                  f"Builder memory estimate {_g(b.get('estimated_peak_bytes'))}."
                  + (f" Skipped: {b['skipped']}." if b.get("skipped") else ""))]
    return lines


def quantize_dynamic_lines(qj: dict) -> list[str]:
    """What quantize_dynamic wrote, graph by graph, next to what our int8 holds."""
    if not qj.get("graphs"):
        return []
    return ["", "What quantize_dynamic produced (op counts of the written graphs; float matrices it left):", "",
            markdown_table(["graph", "quantization ops", "float ops left", "int8 weights", "float matrices left", "largest float matrices"], [
                [k, ", ".join(f"{o} {c}" for o, c in g["ops"].items() if o in ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger")) or "-",
                 ", ".join(f"{o} {c}" for o, c in g["ops"].items() if o in ("MatMul", "Gemm", "Conv", "Gather")) or "-",
                 _g(g["initializer_bytes"].get("int8", 0) + g["initializer_bytes"].get("uint8", 0)), _g(g["float_matrix_bytes"]),
                 "; ".join(f"{m['name']} {m['shape']}" for m in g["float_matrices"][:2]) or "-"]
                for k, g in qj["graphs"].items()]),
            "", "Ours (int8, `exporters/quantize.py`): every linear layer as DynamicQuantizeMatMul (int8 per output column), "
            "and the tied embedding table once, 8-bit, shared by the lookup (GatherBlockQuantized) and the LM head "
            "(MatMulNBits); prefill and decode share one data file."]


if __name__ == "__main__":
    sys.exit(main())
