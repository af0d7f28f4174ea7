"""One backend of `pgexport bench`, measured in a process of its own.

A fresh process per backend gives each one a clean peak-RSS figure and an honest load time
(nothing cached by an earlier backend). The parent (`pgexport.bench.run`) writes a JSON spec and runs

    python -m pgexport.bench.worker SPEC.json RESULT.json

What is measured, batch 1, after one untimed warm-up pass:

* load: from nothing to a ready model (weights read, sessions created);
* vision: the image encoder alone;
* prefill: vision + the whole prompt up to the first token's logits (time to first token);
* decode: every following step, one token each, kept per position (for the position plot).

Every input is passed `repeats` times. The decode steps are *teacher-forced* with the reference's
greedy tokens, so all backends run the same sequence, and the same pass yields the logits that
the accuracy figures compare with the fp32 reference (`pgexport.runtime.quality.logit_quality`: top-1
agreement, mean KL, cosine). Greedy match: a backend's own greedy output equals the reference's
exactly when its argmax agrees with the reference token at every position up to the reference's
eos, which the teacher-forced logits tell without a second run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pgexport.bench.measure import Stats, current_rss_bytes, jsonable, peak_rss_bytes
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.runtime.quality import logit_quality
from pgexport.train.dataset import read_jsonl
from pgexport.train.evaluate import task_accuracy

PROGRESS = "progress: "  # stderr lines the parent shows as they come


def load_backend(spec: dict) -> tuple[Any, Any, Any, dict]:
    """(stepper factory, encode_image(pixels), task runner, info) for the backend in `spec`."""
    backend, path, threads = spec["backend"], spec["path"], spec.get("threads")
    info: dict[str, Any] = {}
    if backend.startswith("onnx"):
        from pgexport.runtime.session import OnnxPaliGemma

        rt = OnnxPaliGemma(path, provider=spec.get("provider", "cpu"), threads=threads)
        info["providers"] = rt.providers
        return rt.stepper, lambda px: rt.encode_image(px), rt, info

    import torch

    from pgexport.eager.generate import generate_text
    from pgexport.eager.loading import load_model, load_processor
    from pgexport.models.generate import EagerStepper

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if spec.get("provider") == "cuda" else "cpu"
    model = load_model(path, dtype=spec.get("dtype", "float32"), device=device)
    info["device"] = device

    def encode(px):
        with torch.inference_mode():
            out = model.encode_image(torch.as_tensor(px, dtype=model.dtype, device=model.device))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    class Runner:  # `generate(images, prompts, max_new_tokens)` for the task-accuracy scorer
        def __init__(self):
            self.processor = load_processor(spec["processor"])

        def generate(self, images, prompts, max_new_tokens=32):
            return generate_text(model, self.processor, images, prompts, max_new_tokens=max_new_tokens)

    return (lambda: EagerStepper(model)), encode, Runner(), info


def timed_pass(encode, new_stepper, batch: dict, n_new: int, fed=None) -> tuple[float, float, list[float], list]:
    """One batch-1 pass: (vision s, prefill s, [s per decode step], [logits [V] per token]).

    The vision encoder is timed alone, then prefill (vision included, up to the first token's
    logits) and `n_new - 1` decode steps fed `fed[s]` (teacher forcing) or, without `fed`, the
    argmax of the previous logits."""
    px = batch["pixel_values"]
    t = time.perf_counter()
    encode(px)  # synchronizes on CUDA (the steppers return numpy, which waits too)
    vision = time.perf_counter() - t
    stepper = new_stepper()
    t = time.perf_counter()
    logits = stepper.prefill(batch["input_ids"], batch["attention_mask"], px, n_new)
    prefill = time.perf_counter() - t
    seq_logits = [np.asarray(logits, np.float32)[0]]
    steps = []
    for s in range(n_new - 1):
        token = fed[s] if fed is not None else int(seq_logits[-1].argmax())
        t = time.perf_counter()
        logits = stepper.decode(np.array([token], np.int64))
        steps.append(time.perf_counter() - t)
        seq_logits.append(np.asarray(logits, np.float32)[0])
    return vision, prefill, steps, seq_logits


def run(spec: dict, load: Callable[[dict], tuple] = load_backend) -> dict:
    """Measure one backend; returns the JSON-able result (see `pgexport.bench.run` for the schema)."""
    t0 = time.perf_counter()
    if spec["backend"].startswith("onnx"):  # importing the libraries is not the model's load time
        import pgexport.runtime.session  # noqa: F401
    else:
        import torch  # noqa: F401

        from pgexport.models import generate  # noqa: F401
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new_stepper, encode, runner, info = load(spec)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_bytes()
    processor = PaliGemmaProcessor.from_pretrained(spec["processor"])
    eos = processor.tokenizer.token_to_id("<eos>")
    n_new = spec["new_tokens"]
    inputs = spec["inputs"]  # [{"image", "prompt"}]
    batches = [processor(images=[x["image"]], prompts=[x["prompt"]]) for x in inputs]
    reference = np.load(spec["reference"]) if spec.get("reference") else None
    ref_tokens = reference["tokens"] if reference is not None else None  # [N, n_new]

    vision, prefill, decode_by_pos = [], [], [[] for _ in range(max(n_new - 1, 0))]
    tokens = np.zeros((len(inputs), n_new), np.int64)
    logits_all: list[np.ndarray] = []
    for rep in range(spec["repeats"] + 1):  # pass 0 is the warm-up
        for i, b in enumerate(batches):
            v, p, steps, seq_logits = timed_pass(encode, new_stepper, b, n_new,
                                                 ref_tokens[i] if ref_tokens is not None else None)
            if rep == 0:
                seq = np.stack(seq_logits)  # [n_new, V]
                if ref_tokens is None:  # the reference itself: its greedy tokens (what it was fed)
                    tokens[i] = seq.argmax(-1)
                logits_all.append(seq)
                continue
            vision.append(v)
            prefill.append(p)
            for s, d in enumerate(steps):
                decode_by_pos[s].append(d)
        if spec.get("progress"):
            print(f"{PROGRESS}{spec['backend']}: pass {rep + 1}/{spec['repeats'] + 1} "
                  f"({'warm-up' if rep == 0 else 'timed'})", file=sys.stderr, flush=True)

    peak_measured = peak_rss_bytes()  # before the accuracy computation, which is not the backend's
    decode_all = [d for pos in decode_by_pos for d in pos]
    dstats = Stats.of(decode_all)
    result: dict[str, Any] = {
        "backend": spec["backend"], "path": spec["path"], "info": info,
        "load_s": load_s,
        "import_s": import_s,  # importing the backend's libraries (torch, ...), before load_s
        "vision_s": Stats.of(vision).to_dict(samples=False),
        "prefill_s": Stats.of(prefill).to_dict(samples=False),
        "decode_s": dstats.to_dict(samples=False),
        "tokens_per_s": (1.0 / dstats.median) if decode_all else None,
        "decode_by_position_ms": [float(np.median(pos)) * 1e3 for pos in decode_by_pos],
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_measured,  # load + timed passes (the accuracy figures' own memory excluded)
        "peak_gpu_bytes": _peak_gpu(spec),
    }
    # Accuracy against the reference logits, on the same teacher-forced sequences.
    if reference is not None:
        ref_logits = [reference[f"logits_{i}"] for i in range(len(inputs))]
        active, matches = [], []
        for i, ref in enumerate(ref_logits):
            hit_eos = np.nonzero(ref_tokens[i] == eos)[0]
            end = int(hit_eos[0]) + 1 if len(hit_eos) else n_new  # positions up to and including eos
            act = np.arange(n_new) < end
            active.append(act)
            matches.append(bool((logits_all[i].argmax(-1)[:end] == ref_tokens[i, :end]).all()))
        q = logit_quality(ref_logits, logits_all, active)
        result["accuracy"] = {**q, "greedy_match_rate": float(np.mean(matches))}
    elif spec.get("logits_out"):  # this backend is the reference
        out = Path(spec["logits_out"])
        np.savez(out, tokens=tokens, **{f"logits_{i}": l for i, l in enumerate(logits_all)})
        result["accuracy"] = {"top1_agreement": 1.0, "mean_kl": 0.0, "mean_cosine": 1.0, "greedy_match_rate": 1.0,
                              "reference": True}
    if spec.get("data"):
        records = read_jsonl(spec["data"])[: spec.get("examples", 200)]
        t = time.perf_counter()
        result["task_accuracy"] = task_accuracy(runner, records, batch_size=16, max_new_tokens=spec.get("task_new_tokens", 40))
        result["task_accuracy"]["seconds"] = time.perf_counter() - t
        result["task_accuracy"]["examples"] = len(records)
    return result


def _peak_gpu(spec: dict) -> int | None:
    if spec.get("provider") != "cuda" or spec["backend"].startswith("onnx"):
        return None  # ONNX Runtime exposes no per-session peak; see the report notes
    import torch

    return int(torch.cuda.max_memory_allocated())


def main(argv: list[str] | None = None, load: Callable[[dict], tuple] | None = None) -> int:
    """`python -m pgexport.bench.worker SPEC.json RESULT.json`. `load` replaces `load_backend`
    (benchmarks/bench_quant_baselines.py measures other libraries' backends the same way)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec, load or load_backend)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
