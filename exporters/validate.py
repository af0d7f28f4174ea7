"""Check an export folder against the eager PyTorch model it came from; writes `export_report.json`.

The sample is the bundled image (and its mirror image) with two prompts of different lengths, so
the batch of 2 is left-padded. Measured:

* `vision_max_abs_diff`: image features, ONNX vs eager;
* `prefill_logits_max_abs_diff`, `decode_logits_max_abs_diff` (per step): next-token logits,
  with the decode steps fed the eager greedy tokens (teacher forcing), so both sides always see
  the same inputs;
* `greedy_agreement`: the fraction of tokens on which independent greedy generations (eager and
  ONNX Runtime, `greedy_tokens` new tokens per row) agree; `greedy_match_prefix` the number of
  leading steps on which every row agrees.

`passed` requires finite logits, every logit difference within `tolerance` (absolute, scaled by
the largest eager logit magnitude when that exceeds 1) and greedy agreement, unless the first
divergence is a near tie (the eager margin between the two candidates within twice the
tolerance), which rounding can legitimately flip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pgexport.generation import generate_tokens

REPORT_FILE = "export_report.json"
PROMPTS = ["caption en", "answer en what colour is the circle?"]
# Relative tolerances on the logits (times max(1, max |eager logit|)).
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}


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
    from PIL import Image

    from pgexport.api import sample_image

    image = sample_image()
    images = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return processor(images=images, prompts=PROMPTS), images


def validate_export(export_dir, model, processor, max_new_tokens: int = 16, decode_steps: int = 4,
                    threads: int | None = None, tolerance: float | None = None, provider: str = "cpu",
                    write: bool = True) -> dict:
    """Compare the folder's graphs under ONNX Runtime with `model` (eager); returns the report.

    `model` is a `PaliGemma`, or a function returning one: it is then loaded for the eager
    reference and released before ONNX Runtime loads the export (one model in memory at a time).
    """
    import gc

    import torch

    from pgexport.models.generate import EagerStepper
    from pgexport.runtime import OnnxPaliGemma

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
    logits, past = rt.prefill(ids, features, mask)
    prefill_diff = float(np.abs(logits - recorder.logits[0]).max())
    finite = bool(np.isfinite(logits).all())
    decode_diffs = []
    step_mask = mask
    for step, tokens in enumerate(recorder.tokens[:decode_steps]):
        step_mask = np.concatenate([step_mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        logits, past = rt.decode(tokens[:, None], step_mask, past)
        finite &= bool(np.isfinite(logits).all())
        decode_diffs.append(float(np.abs(logits - recorder.logits[step + 1]).max()))
    del past

    got_tokens = rt.generate_ids(ids, mask, pix, max_new_tokens)
    n = max(ref_tokens.shape[1], got_tokens.shape[1])
    ref_full, got_full = (np.pad(t, ((0, 0), (0, n - t.shape[1])), constant_values=pad) for t in (ref_tokens, got_tokens))
    same = ref_full == got_full
    agreement = float(same.mean())
    prefix = int(np.argmin(same.all(0))) if not same.all() else n

    failures = []
    if not finite:
        failures.append("ONNX Runtime produced non-finite logits")
    worst = max([prefill_diff, *decode_diffs])
    if worst > tol:
        failures.append(f"max logit difference {worst:.3e} > tolerance {tol:.3e}")
    near_tie = None
    if prefix < n:
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
        "quantization": rt.manifest.quantization,
        "provider": rt.providers[0],
        "sample": {"image": "pgexport/assets/sample.png (+ its mirror image)", "prompts": PROMPTS,
                   "batch": int(ids.shape[0]), "padding": "left",
                   "prompt_tokens": [int(x) for x in mask.sum(-1)]},
        "vision_max_abs_diff": vision_diff,
        "prefill_logits_max_abs_diff": prefill_diff,
        "decode_logits_max_abs_diff": decode_diffs,
        "logits_max_abs_diff": worst,
        "max_abs_eager_logit": scale,
        "tolerance": tol,
        "greedy_tokens": int(n),
        "greedy_agreement": agreement,
        "greedy_match_prefix": prefix,
        "near_tie": near_tie,
        "eager_tokens": ref_full.tolist(),
        "onnx_tokens": got_full.tolist(),
        "eager_text": processor.batch_decode(ref_tokens),
        "onnx_text": processor.batch_decode(got_tokens),
        "seconds": round(time.perf_counter() - start, 3),
    }
    rt.close()
    if write:
        (export_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
