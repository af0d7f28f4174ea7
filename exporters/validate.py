"""Check an export folder against the eager PyTorch model it came from; writes `export_report.json`.

The sample is the bundled image (and its mirror image) with two prompts of different lengths, so
the batch of 2 is left-padded. The report holds:

* `vision_max_abs_diff`: image features, ONNX vs eager;
* `prefill_logits_max_abs_diff`, `decode_logits_max_abs_diff` (per step): next-token logits,
  with the decode steps fed the eager greedy tokens (teacher forcing), so both sides always see
  the same inputs;
* `split_graphs_max_abs_diff`: the same teacher-forced logits through prefill.onnx + decode.onnx
  (the three-graph contract) against decoder.onnx (what the runtime runs);
* `greedy_agreement`: the fraction of tokens on which independent greedy generations (eager and
  ONNX Runtime, `greedy_tokens` new tokens per row) agree; `greedy_match_prefix` the number of
  leading steps on which every row agrees.

* `quality`: over every teacher-forced step (prefill, then each decode step fed the eager greedy
  token, rows that already ended excluded): `top1_agreement` (same argmax as eager), `mean_kl`
  (KL(eager || ONNX) of the softmax, nats), `mean_cosine` / `min_cosine` of the logit vectors,
  `positions`; and `greedy_sequence_match` (fraction of rows whose whole greedy output equals
  eager's).

`passed` requires finite logits, and then:

* float32 / float16 exports: every logit difference within `tolerance` (absolute, scaled by the
  largest eager logit magnitude when that exceeds 1) and greedy agreement, unless the first
  divergence is a near tie (the eager margin between the two candidates within twice the
  tolerance), which rounding can legitimately flip;
* int8 / int4 weight-quantized exports (manifest `quantization.bits`): the accuracy gates of
  `QUANT_GATES` on `quality` (quantization error is not a rounding error: 1e-4 tolerances do
  not apply, and greedy runs may legitimately part ways on a close call, so they are reported,
  not gated).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pgexport.bundled import sample_image
from pgexport.models.generate import EagerStepper
from pgexport.runtime.generation import generate_tokens
from pgexport.runtime.quality import logit_quality
from pgexport.runtime.session import OnnxPaliGemma

REPORT_FILE = "export_report.json"
PROMPTS = ["caption en", "answer en what colour is the circle?"]
# Relative tolerances on the logits (times max(1, max |eager logit|)).
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}
# Accuracy gates of weight-quantized exports on the validation sample, by weight bits. Loose on
# purpose: the sample is ~30 positions of one image, and the random test models (near-flat
# logits) are the hard case; they still catch a broken layer (tests/test_quantize.py scales one
# layer's quantization scales and checks the gate fails). The task-level gates are in
# docs/quantization.md.
QUANT_GATES = {
    8: {"min_top1_agreement": 0.90, "max_mean_kl": 0.01, "min_mean_cosine": 0.995},
    4: {"min_top1_agreement": 0.75, "max_mean_kl": 0.1, "min_mean_cosine": 0.95},
}


def quality_failures(quality: dict, gates: dict) -> list[str]:
    """The accuracy gates `quality` misses (empty when it passes)."""
    failures = []
    if quality["top1_agreement"] < gates["min_top1_agreement"]:
        failures.append(f"teacher-forced top-1 agreement {quality['top1_agreement']:.1%} < {gates['min_top1_agreement']:.0%}")
    if quality["mean_kl"] > gates["max_mean_kl"]:
        failures.append(f"mean KL divergence {quality['mean_kl']:.3e} > {gates['max_mean_kl']:.0e}")
    if quality["mean_cosine"] < gates["min_mean_cosine"]:
        failures.append(f"mean logit cosine {quality['mean_cosine']:.4f} < {gates['min_mean_cosine']}")
    return failures


def quant_bits(quantization) -> int | None:
    """Weight bits of a manifest's `quantization` entry (None: not weight-quantized)."""
    if isinstance(quantization, dict) and isinstance(quantization.get("bits"), int):
        return quantization["bits"]
    return None


class _Recorder:
    """Wraps a stepper and records the logits it returns and the tokens it is fed."""

    def __init__(self, stepper):
        self.stepper, self.logits, self.tokens = stepper, [], []

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens):
        out = self.stepper.prefill(input_ids, attention_mask, pixel_values, max_new_tokens)
        self.logits.append(np.asarray(out, np.float32))
        return out

    def decode(self, tokens):
        self.tokens.append(np.asarray(tokens, np.int64).copy())
        out = self.stepper.decode(tokens)
        self.logits.append(np.asarray(out, np.float32))
        return out


def sample_batch(processor) -> tuple[dict, list]:
    """The validation sample: bundled image + mirror, two prompts (left-padded batch of 2)."""
    image = sample_image()
    images = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return processor(images=images, prompts=PROMPTS), images


def _split_graphs_diff(export_dir, provider, threads, ids, features, mask, tokens, want) -> float:
    """Max |logits| difference of prefill.onnx + decode.onnx (two sessions) from `want`."""
    with OnnxPaliGemma(export_dir, provider=provider, threads=threads, single_decoder=False) as split:
        logits, past = split.prefill(ids, features, mask)
        worst = float(np.abs(logits - want[0]).max())
        for step, tok in enumerate(tokens):
            mask = np.concatenate([mask, np.ones((len(tok), 1), np.int64)], axis=1)
            logits, past = split.decode(tok[:, None], mask, past)
            worst = max(worst, float(np.abs(logits - want[step + 1]).max()))
    return worst


def validate_export(export_dir, model, processor, max_new_tokens: int = 16, decode_steps: int = 4,
                    threads: int | None = None, tolerance: float | None = None, provider: str = "cpu",
                    write: bool = True, gates: dict | None = None) -> dict:
    """Compare the folder's graphs under ONNX Runtime with `model` (eager); returns the report.

    `model` is a `PaliGemma`, or a function returning one: it is then loaded for the eager
    reference and released before ONNX Runtime loads the export (one model in memory at a time).
    `gates` overrides `QUANT_GATES[bits]` for a weight-quantized export.
    """
    start = time.perf_counter()
    export_dir = Path(export_dir)
    batch, _ = sample_batch(processor)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    owned = not isinstance(model, torch.nn.Module)
    if owned:
        model = model()
    cfg = model.cfg
    eos, pad = cfg.eos_token_id, cfg.pad_token_id

    # Eager reference: image features, then a greedy run that records every step's logits.
    model = model.eval()
    with torch.inference_mode():
        ref_features = model.encode_image(torch.from_numpy(pix).to(model.device, model.dtype)).float().cpu().numpy()
    recorder = _Recorder(EagerStepper(model))
    ref_tokens = generate_tokens(recorder, ids, mask, pix, max_new_tokens, eos, pad)
    recorder.stepper = None  # the stepper holds the model and its KV cache
    if owned:
        del model
        gc.collect()

    rt = OnnxPaliGemma(export_dir, provider=provider, threads=threads)
    dtype = rt.manifest.dtype
    scale = max(1.0, float(max(np.abs(x).max() for x in recorder.logits)))
    tol = (tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-3)) * scale

    features = rt.encode_image(pix)
    vision_diff = float(np.abs(features.astype(np.float32) - ref_features).max())
    # Teacher forcing through the runtime's own stepper (what `generate` runs): prefill, then
    # every decode step fed the eager greedy token.
    stepper = rt.stepper()
    logits = stepper.prefill(ids, mask, pix, len(recorder.tokens) + 1)
    got_logits = [logits]
    finite = bool(np.isfinite(logits).all())
    active = [np.ones(len(ids), bool)]
    ended = np.zeros(len(ids), bool)
    for tokens in recorder.tokens:
        ended |= tokens == eos
        logits = stepper.decode(tokens)
        finite &= bool(np.isfinite(logits).all())
        got_logits.append(logits)
        active.append(~ended.copy())
    del stepper
    prefill_diff = float(np.abs(got_logits[0] - recorder.logits[0]).max())
    decode_diffs = [float(np.abs(got - ref).max()) for got, ref in
                    zip(got_logits[1:decode_steps + 1], recorder.logits[1:decode_steps + 1])]
    quality = logit_quality(recorder.logits[:len(got_logits)], got_logits, active)

    got_tokens = rt.generate_ids(ids, mask, pix, max_new_tokens)
    n = max(ref_tokens.shape[1], got_tokens.shape[1])
    ref_full, got_full = (np.pad(t, ((0, 0), (0, n - t.shape[1])), constant_values=pad) for t in (ref_tokens, got_tokens))
    same = ref_full == got_full
    agreement = float(same.mean())
    prefix = int(np.argmin(same.all(0))) if not same.all() else n

    quality["greedy_sequence_match"] = float(same.all(1).mean())
    quality["greedy_token_agreement"] = agreement
    manifest, providers = rt.manifest, rt.providers
    single = rt.single_decoder
    rt.close()
    del rt
    gc.collect()
    # The runtime ran decoder.onnx; the prefill / decode pair of the three-graph contract must
    # give the same logits (the same modules traced twice), checked on the same teacher-forced steps.
    split_diff = None
    if single:
        split_diff = _split_graphs_diff(export_dir, provider, threads, ids, features, mask, recorder.tokens[:decode_steps],
                                        got_logits[:decode_steps + 1])

    failures = []
    if not finite:
        failures.append("ONNX Runtime produced non-finite logits")
    worst = max([prefill_diff, *decode_diffs])
    bits = quant_bits(manifest.quantization)
    near_tie = None
    if bits is not None:
        gates = {**QUANT_GATES.get(bits, QUANT_GATES[4]), **(gates or {})}
        failures += quality_failures(quality, gates)
    elif worst > tol:
        failures.append(f"max logit difference {worst:.3e} > tolerance {tol:.3e}")
    if split_diff is not None and split_diff > tol:
        failures.append(f"prefill.onnx / decode.onnx differ from decoder.onnx by {split_diff:.3e} > {tol:.3e}")
    if bits is None and prefix < n:
        # Explained if eager itself barely preferred its token over the ONNX one at that step.
        row = int(np.argmin(same[:, prefix]))
        step_logits = recorder.logits[prefix][row] if prefix < len(recorder.logits) else None
        if step_logits is not None:
            margin = float(step_logits[ref_full[row, prefix]] - step_logits[got_full[row, prefix]])
            near_tie = {"step": prefix, "row": row, "eager_margin": margin}
            if margin > 2 * tol:
                failures.append(f"greedy tokens diverge at step {prefix} (row {row}) with an eager margin of "
                                f"{margin:.3e}, not a near tie")
        else:
            failures.append(f"greedy tokens diverge at step {prefix}")

    report = {
        "format_version": 1,
        "passed": not failures,
        "failures": failures,
        "dtype": dtype,
        "quantization": manifest.quantization,
        "provider": providers[0],
        "sample": {"image": "pgexport/assets/sample.png (+ its mirror image)", "prompts": PROMPTS,
                   "batch": int(ids.shape[0]), "padding": "left",
                   "prompt_tokens": [int(x) for x in mask.sum(-1)]},
        "vision_max_abs_diff": vision_diff,
        "prefill_logits_max_abs_diff": prefill_diff,
        "decode_logits_max_abs_diff": decode_diffs,
        "logits_max_abs_diff": worst,
        "split_graphs_max_abs_diff": split_diff,
        "max_abs_eager_logit": scale,
        "tolerance": tol,
        "greedy_tokens": int(n),
        "greedy_agreement": agreement,
        "greedy_match_prefix": prefix,
        "near_tie": near_tie,
        "quality": quality,
        "gates": gates if bits is not None else None,
        "eager_tokens": ref_full.tolist(),
        "onnx_tokens": got_full.tolist(),
        "eager_text": processor.batch_decode(ref_tokens),
        "onnx_text": processor.batch_decode(got_tokens),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if write:
        (export_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
