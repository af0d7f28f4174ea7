"""The benchmark scripts' shared harness.

* measuring and reporting: `pgexport.bench.measure` re-exported (the timing, RSS and Markdown
  code shared with `pgexport bench`), `progress` on a clock that child processes share,
  `save_results` / `write_report` (a script's last step) and `profile_table` (torch.profiler);
* child processes: a child prints its result with `emit`; the parent runs it with `run_child`
  (result, output tail, wall time, peak RSS, sampled private / file-backed memory, load
  average) or, for the `pgexport.bench.worker` spec -> result protocol, with `run_worker`;
  `init_command` writes a random checkpoint (`pgexport init`);
* inputs: `random_inputs` (random prompt and image at a config's geometry), `scene_input` (one
  synthetic shapes scene with its caption prompt) and `processed`;
* models: `reduced_config` / `reduce_depth` / `within_depth` (the first N decoder layers of a
  geometry, a model or a checkpoint's tensor names), `transformers_sharing` (transformers'
  `PaliGemmaForConditionalGeneration` holding our model's tensors), the runners `OursRunner`,
  `HFRunner`, `OrtRunner` and the step-by-step interleaving `paired_generation` /
  `generation_runs`;
* ONNX Runtime: `ort_session` (one CPU session), `quantized_copy` (an export quantized the way
  `pgexport onnx --quant` does it).

    >>> from benchmarks.common import interleaved, progress
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pgexport.bench.measure import *  # noqa: F401,F403  (one copy of the measuring code)
from pgexport.bench.measure import interleaved, machine_info, meminfo_kb, timed_call, write_results

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- progress
CLOCK_ENV = "PGEXPORT_BENCH_T0"  # a parent's clock origin (perf_counter is system-wide), for its children
_T0 = float(os.environ.get(CLOCK_ENV) or time.perf_counter())


def progress(msg: str) -> None:
    """One line on stderr, prefixed with the seconds since the script (or its parent) started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def share_clock() -> None:
    """Children started from now on print their progress lines on this process's clock."""
    os.environ[CLOCK_ENV] = repr(_T0)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def meminfo_bytes(key: str) -> int:
    """A /proc/meminfo field ("MemAvailable", "MemTotal") in bytes; 0 where there is none."""
    return (meminfo_kb(key) or 0) * 1024


# --------------------------------------------------------------------------- reports
def command_line(script: str, argv: Iterable[str] | None = None) -> str:
    """How the script was run, for the report: `python benchmarks/SCRIPT ARGS`."""
    return " ".join([f"python benchmarks/{script}"] + list(argv if argv is not None else sys.argv[1:]))


def save_results(out: str | Path, data: dict[str, Any], markdown: str, echo: bool = False) -> tuple[Path, Path]:
    """Write `out`.json and `out`.md, say where (and print the Markdown when `echo`)."""
    paths = write_results(out, data, markdown)
    progress("wrote " + ", ".join(map(str, paths)))
    if echo:
        print(markdown)
    return paths


def write_report(out: str | Path, result: dict[str, Any], render: Callable[[dict, str], str], script: str,
                 argv: Iterable[str] | None, packages: Iterable[str] = ("onnxruntime", "numpy")) -> int:
    """A script's last step: add the machine to `result`, write `out`.json and `out`.md
    (`render(result, command line)`), say where. Returns 0 (the exit status).

        >>> write_report(args.out, result, markdown, "bench_pair.py", argv)  # doctest: +SKIP
    """
    result["machine"] = machine_info(list(packages))
    save_results(out, result, render(result, command_line(script, argv)))
    return 0


def profile_table(fn: Callable[[], Any], row_limit: int = 20, sort_by: str = "self_cpu_time_total") -> tuple[str, list[dict[str, Any]]]:
    """Run `fn` once under torch.profiler (CPU): the text table and the top ops as dicts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    avgs = prof.key_averages()
    table = avgs.table(sort_by=sort_by, row_limit=row_limit)
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    total = sum(e.self_cpu_time_total for e in avgs) or 1
    rows = [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "self_cpu_pct": 100.0 * e.self_cpu_time_total / total, "cpu_total_ms": e.cpu_time_total / 1e3}
        for e in top
    ]
    return table, rows


def export_folders(ap, paths: Iterable[str], needed: str) -> list[Path]:
    """The positional export folders of a script: each must hold `needed`, and their names
    (which label the results) must differ; otherwise a usage error."""
    folders = [Path(p) for p in paths]
    for f in folders:
        if not (f / needed).is_file():
            ap.error(f"{f} has no {needed}: pass export folders (written by pgexport onnx --out DIR)")
    if len({f.name for f in folders}) != len(folders):
        ap.error("folders must have different names (they label the results)")
    return folders


# --------------------------------------------------------------------------- child processes
RESULT_TAG = "@@RESULT "  # a child's result line on stdout: the tag, then one JSON object


def emit(result: dict) -> None:
    """A child's result, as one tagged JSON line on stdout (what `run_child` collects)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


class MemorySampler:
    """Polls a process's /proc/PID/status: the largest RssAnon (private memory) and RssFile
    (resident pages of mapped files, which the kernel can drop under pressure) seen while it runs.
    VmHWM, the peak RSS a process reports itself, counts both."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.path, self.interval = Path(f"/proc/{pid}/status"), interval
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if line.startswith(("RssAnon", "RssFile")))
            self.anon = max(self.anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
            self.file = max(self.file, int(fields.get("RssFile", "0 kB").split()[0]) * 1024)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=2)
        return {"peak_rss_anon_sampled": self.anon, "peak_rss_file_sampled": self.file}


def _load_avg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


@dataclass
class Child:
    """What `run_child` saw of one child process."""

    code: int  # exit status
    result: dict | None  # its RESULT_TAG line, parsed (None: it printed none)
    tail: list[str]  # its last non-empty other output lines
    wall_s: float
    peak_rss: int  # the child's own peak RSS (wait4's ru_maxrss), bytes
    sampled: dict = field(default_factory=dict)  # MemorySampler's peaks, when sampled
    load_avg_before: list[float] = field(default_factory=list)
    load_avg_after: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.result is not None

    def failure(self, lines: int = 3) -> str:
        """One line for a failed child: its exit status and its last output lines."""
        return f"exit status {self.code}: {' | '.join(self.tail[-lines:]) or 'no output'}"


def run_child(cmd: list[str], env: dict | None = None, log: Path | None = None, echo: bool = True,
              sample_memory: bool = False, keep: int = 30) -> Child:
    """Run `cmd` in the repository root and wait for it. Its stdout and stderr come through one
    pipe: a RESULT_TAG line is its result; a `pgexport.bench.worker` progress line is shown with
    `progress`; any other line goes to `log` when given, else to stderr when `echo`, and the last
    `keep` non-empty ones are kept to explain a failure."""
    from pgexport.bench.worker import PROGRESS

    before = _load_avg()
    t = time.perf_counter()
    result, tail = None, []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid) if sample_memory else None
    with open(log, "w") if log else contextlib.nullcontext() as logf:
        for line in proc.stdout:
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                continue
            if line.startswith(PROGRESS):
                progress("  " + line[len(PROGRESS):].rstrip())
                continue
            if logf:
                logf.write(line)
            elif echo:
                sys.stderr.write(line)
                sys.stderr.flush()
            if line.strip():
                tail = (tail + [line.rstrip()])[-keep:]
    proc.stdout.close()
    sampled = sampler.stop() if sampler else {}
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here: wait4 gives the child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Child(proc.returncode, result, tail, time.perf_counter() - t, usage.ru_maxrss * 1024, sampled,
                 before, _load_avg())


def run_worker(spec: dict, spec_path: Path, result_path: Path, command: list[str] | None = None,
               sample_memory: bool = False) -> tuple[Child, dict | None]:
    """One backend measured in a fresh process through the `pgexport.bench.worker` protocol (spec
    JSON in, result JSON out): `python -m pgexport.bench.worker SPEC RESULT`, or `command` + SPEC
    RESULT for a script's own worker. OMP_NUM_THREADS follows the spec's threads."""
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = (command or [sys.executable, "-m", "pgexport.bench.worker"]) + [str(spec_path), str(result_path)]
    child = run_child(cmd, env=env, echo=False, sample_memory=sample_memory, keep=20)
    result = json.loads(result_path.read_text()) if child.code == 0 and result_path.is_file() else None
    return child, result


def init_command(preset: str, out: str | Path, dtype: str | None = None) -> list[str]:
    """`pgexport init`: a checkpoint of `preset` with random weights, written to `out`."""
    return [sys.executable, "-m", "pgexport.cli", "init", "--preset", preset, "--out", str(out)] + \
        (["--dtype", dtype] if dtype else [])


# --------------------------------------------------------------------------- inputs
def random_inputs(cfg, text_tokens: int, seed: int, batch: int = 1):
    """(input_ids, attention_mask, pixel_values), numpy: `<image>` x N + <bos> + random ordinary
    tokens + "\\n" (`text_tokens` after the image tokens, the same in every row) and random images
    in [-1, 1], at `cfg`'s geometry."""
    rng = np.random.default_rng(seed)
    n_mid = max(text_tokens - 2, 0)
    high = min(200000, cfg.image_token_id - 1152)  # below the <loc>/<seg> tokens (tiny vocabularies too)
    text = [cfg.bos_token_id] + rng.integers(min(1000, high // 2), high, n_mid).tolist() + [108]
    ids = np.array([[cfg.image_token_id] * cfg.num_image_tokens + text] * batch, dtype=np.int64)
    size = cfg.vision.image_size
    px = (rng.random((batch, 3, size, size), dtype=np.float32) * 2 - 1).astype(np.float32)
    return ids, np.ones_like(ids), px


def scene_input(work: Path) -> dict:
    """{"image": path, "prompt"}: `pgexport bench`'s first input, one synthetic shapes scene saved
    in `work` with its caption prompt."""
    from pgexport.bench.run import bench_inputs

    return bench_inputs(1, None, work)[0]


def processed(processor_folder: str | Path, x: dict) -> dict:
    """The pgexport processor's batch of one `{"image", "prompt"}` input."""
    from pgexport.processing.processor import PaliGemmaProcessor

    return PaliGemmaProcessor.from_pretrained(str(processor_folder))(images=[x["image"]], prompts=[x["prompt"]])


# --------------------------------------------------------------------------- depth reduction
def reduced_config(cfg, text_layers: int | None = None, vision_layers: int | None = None):
    """`cfg` with only the first `text_layers` decoder / `vision_layers` SigLIP layers (widths,
    vocabulary and image size kept)."""
    text: dict[str, Any] = {}
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        if cfg.text.layer_types:
            text["layer_types"] = cfg.text.layer_types[:text_layers]
    vision = {} if vision_layers is None else {"num_hidden_layers": vision_layers}
    return cfg.replace(text=text, vision=vision)


def within_depth(name: str, text_layers: int | None) -> bool:
    """Whether the tensor `name` (our internal naming) is kept at `text_layers` decoder layers:
    False only for a tensor of decoder layer `text_layers` or deeper."""
    prefix = "language_model.layers."
    return text_layers is None or not name.startswith(prefix) or int(name[len(prefix):].split(".")[0]) < text_layers


def reduce_depth(model, text_layers: int):
    """A model with the first `text_layers` decoder layers of `model`, sharing its tensors."""
    import torch

    from pgexport.models import PaliGemma

    with torch.device("meta"):
        small = PaliGemma(reduced_config(model.cfg, text_layers))
    keep = set(small.state_dict())
    small.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep}, strict=True, assign=True)
    return small.eval()


# --------------------------------------------------------------------------- transformers reference
def transformers_sharing(ours, attn: str = "sdpa"):
    """transformers' `PaliGemmaForConditionalGeneration` at `ours`' geometry, built without
    initialising its parameters and then given ours' tensors (assigned, not copied): one copy of
    the weights for both models."""
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


# --------------------------------------------------------------------------- runners
# A runner holds one model and one batch-1 input (numpy): `vision()` runs the image encoder,
# `prefill(new_tokens)` the prompt up to the first token's logits (vision included), `decode(token)`
# one greedy step; both return the argmax and keep `logits`.
class OursRunner:
    """Our eager model through `EagerStepper` (static KV cache sized prompt + new tokens)."""

    def __init__(self, model, ids, mask, px):
        from pgexport.eager.generate import EagerStepper

        self.model, self.stepper = model, EagerStepper(model)
        self.ids, self.mask, self.px = ids, mask, px

    def vision(self):
        import torch

        return self.model.encode_image(torch.from_numpy(self.px))

    def prefill(self, new_tokens: int) -> int:
        self.logits = self.stepper.prefill(self.ids, self.mask, self.px, new_tokens)
        return int(self.logits[0].argmax())

    def decode(self, token: int) -> int:
        self.logits = self.stepper.decode(np.array([token], dtype=np.int64))
        return int(self.logits[0].argmax())


class HFRunner:
    """transformers' model as its `generate` runs it per step, without logits processors or
    stopping criteria: prefill with `pixel_values`, `token_type_ids` = 0 (the whole prompt is
    prefix, bidirectional), a fresh `DynamicCache` and `logits_to_keep=1`; decode one token with
    the cache and the growing all-ones attention mask."""

    def __init__(self, model, ids, mask, px):
        import torch

        self.torch = torch
        self.model = model
        self.ids, self.mask, self.px = torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(px)
        self.tt = torch.zeros_like(self.ids)

    def vision(self):
        return self.model.get_image_features(self.px).pooler_output

    def prefill(self, new_tokens: int) -> int:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        S = self.ids.shape[1]
        self.full_mask = self.torch.ones(1, S + new_tokens, dtype=self.torch.long)
        self.length = S
        out = self.model(input_ids=self.ids, pixel_values=self.px, attention_mask=self.mask,
                         token_type_ids=self.tt, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1]
        return int(self.logits[0].argmax())

    def decode(self, token: int) -> int:
        self.length += 1
        out = self.model(input_ids=self.torch.tensor([[token]]), attention_mask=self.full_mask[:, : self.length],
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1]
        return int(self.logits[0].argmax())


class OrtRunner:
    """`pgexport.runtime.OnnxPaliGemma`, a fresh stepper per prefill."""

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


def paired_generation(runners: dict[str, Any], new_tokens: int, first: int = 0) -> dict[str, dict[str, Any]]:
    """Prefill every runner, then decode `new_tokens` greedy steps with the runners alternating
    step by step (each step timed on its own, wall and process CPU time).

    Interleaving at step granularity makes each decode step of one runner sit next to the same
    step of the others in time, so a change in the neighbours' load hits all alike. The order
    reverses at every step (A B B A A B ...) and an odd `first` starts it with the second runner.
    """
    names = list(runners)
    order = names[first % 2:] + names[: first % 2]
    out = {n: {"step_s": [], "step_cpu_s": [], "tokens": []} for n in names}
    for n in order:
        run = timed_call(lambda n=n: runners[n].prefill(new_tokens))
        out[n].update(prefill_s=run.seconds, prefill_cpu_s=run.cpu_seconds, prefill_peak_extra=run.peak_extra_bytes)
        out[n]["tokens"].append(run.result)
    for i in range(new_tokens):
        for n in (order if i % 2 == 0 else order[::-1]):
            c, t = time.process_time(), time.perf_counter()
            tok = runners[n].decode(out[n]["tokens"][-1])
            out[n]["step_s"].append(time.perf_counter() - t)
            out[n]["step_cpu_s"].append(time.process_time() - c)
            out[n]["tokens"].append(tok)
    return out


def generation_runs(runners: dict[str, Any], repeats: int, warmup: int, new_tokens: int, warmup_tokens: int,
                    first: int = 0, label: str = "generate"):
    """(vision, generations): the runners' vision encoders interleaved (`interleaved`), then
    `warmup` untimed and `repeats` timed `paired_generation`s (the order rotated by `first` +
    the repeat's index). Call it under torch.inference_mode when torch models take part."""
    vis = interleaved({n: r.vision for n, r in runners.items()}, repeats, warmup, label="vision")
    for w in range(warmup):
        paired_generation(runners, min(new_tokens, warmup_tokens), first=w)
    gen = []
    for r in range(repeats):
        g = paired_generation(runners, new_tokens, first=first + r)
        gen.append(g)
        progress(f"[{label}] repeat {r + 1}/{repeats}: " + ", ".join(
            f"{n} prefill {g[n]['prefill_s'] * 1e3:.0f} ms (cpu {g[n]['prefill_cpu_s'] / g[n]['prefill_s']:.2f}x) "
            f"decode {statistics.median(g[n]['step_s']) * 1e3:.1f} ms/token" for n in runners))
    return vis, gen


def runner_samples(vis, gen: list[dict], name: str, cpu: bool = False) -> dict[str, list]:
    """One runner's raw samples from `generation_runs`: vision, prefill and decode-step seconds
    (with their process CPU seconds when `cpu`) and the greedy tokens, per repeat."""
    out: dict[str, list] = {"vision_s": [r.seconds for r in vis[name].runs]}
    if cpu:
        out["vision_cpu_s"] = [r.cpu_seconds for r in vis[name].runs]
    for key, src in (("prefill_s", "prefill_s"), ("step_s", "step_s")):
        out[key] = [g[name][src] for g in gen]
        if cpu:
            out[key.replace("_s", "_cpu_s")] = [g[name][src.replace("_s", "_cpu_s")] for g in gen]
    out["tokens"] = [g[name]["tokens"] for g in gen]
    return out


# --------------------------------------------------------------------------- ONNX Runtime
def ort_session(path: str | Path, threads: int, profile_prefix: str | None = None, quiet: bool = False):
    """A CPU ONNX Runtime session of one graph, `threads` intra-op threads (ONNX Runtime's
    defaults otherwise: weight prepacking on), profiling to `profile_prefix` when given."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if quiet:
        so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quantized_copy(base: Path, folder: Path, options) -> Path:
    """A copy of the fp32 export `base` in `folder`, quantized with `options` (`QuantOptions`) by
    the exporter's quantizer, its manifest saying so (as `pgexport onnx --quant` writes it)."""
    from pgexport.exporters.quantize import quantize_folder
    from pgexport.runtime.manifest import read_manifest, write_manifest

    shutil.copytree(base, folder)
    info = quantize_folder(folder, options)
    manifest = read_manifest(folder)
    manifest.quantization = {k: v for k, v in info.items() if not k.startswith("bytes_")}
    write_manifest(folder, manifest)
    return folder
