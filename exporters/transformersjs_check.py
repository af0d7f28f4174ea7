"""A transformers.js folder run with ONNX Runtime the way transformers.js 4.x runs it, and its
validation against eager PyTorch.

`TransformersJsStepper` replays the library's calls (its `generic_text_to_text_forward` and
`generate` loop): embed_tokens on the ids, the vision features written over the `<image>`
rows, the decoder on an empty past (shapes from the graph, `batch_size` resolved, other axes 0),
then one token per call with an all-ones `attention_mask` over the past (the library rebuilds it
so), the `present` outputs fed back as `past_key_values`. It plugs into the shared generation loop.

    >>> stepper = TransformersJsStepper({"vision_encoder": ..., ...}, image_token_id=257152)  # doctest: +SKIP
    >>> generate_tokens(stepper, ids, mask, pixels, 16, eos, pad)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pgexport.exporters.validate import QUANT_GATES, TOLERANCE, quality_failures, sample_batch
from pgexport.models.checkpoint import load_checkpoint
from pgexport.models.generate import EagerStepper
from pgexport.models.paligemma import PaliGemma
from pgexport.runtime.generation import generate_tokens
from pgexport.runtime.quality import logit_quality

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class TransformersJsStepper:
    """Prefill / decode over the three sessions of a transformers.js folder (a new one per generation).

    `files`: {"vision_encoder", "embed_tokens", "decoder_model_merged"} -> ONNX file path.
    """

    def __init__(self, files: dict[str, str | Path], image_token_id: int, threads: int | None = None):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in files.items()}
        self.image_token_id = image_token_id
        decoder = self.sessions["decoder_model_merged"]
        self.past_inputs = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in decoder.get_outputs()]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(None, {"input_ids": ids.astype(np.int64)})[0]

    def _run(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"inputs_embeds": embeds, "attention_mask": mask.astype(np.int64), **self.past}
        out = dict(zip(self.outputs, self.sessions["decoder_model_merged"].run(None, feed)))
        self.past = {k.replace("present", "past_key_values", 1): v for k, v in out.items() if k.startswith("present")}
        return out["logits"][:, -1].astype(np.float32)  # the library reads the last position

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        features = self.sessions["vision_encoder"].run(None, {"pixel_values": np.asarray(pixel_values, np.float32)})[0]
        embeds = self._embed(ids)
        is_image = ids == self.image_token_id
        embeds[is_image] = features.reshape(-1, features.shape[-1])[: int(is_image.sum())]
        batch = len(ids)
        self.past = {i.name: np.zeros([batch if d == "batch_size" else (d if isinstance(d, int) else 0) for d in i.shape],
                                      ORT_TYPES[i.type]) for i in self.past_inputs}
        self.past_len = 0
        logits = self._run(embeds, np.asarray(attention_mask, np.int64))
        self.past_len = ids.shape[1]
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, np.int64)[:, None]
        mask = np.ones((len(ids), self.past_len + 1), np.int64)  # what the library passes after the first call
        logits = self._run(self._embed(ids), mask)
        self.past_len += 1
        return logits


class _Recorder:
    """Wraps a stepper; records the logits it returns and the tokens it is fed."""

    def __init__(self, stepper):
        self.stepper, self.logits, self.tokens = stepper, [], []

    def prefill(self, *args):
        self.logits.append(self.stepper.prefill(*args))
        return self.logits[-1]

    def decode(self, tokens):
        self.tokens.append(np.asarray(tokens, np.int64).copy())
        self.logits.append(self.stepper.decode(tokens))
        return self.logits[-1]


def validate_transformersjs(files: dict[str, Path], bits: int | None, dtype: str, model: PaliGemma | Path, processor,
                            max_new_tokens: int = 16, threads: int | None = None) -> dict:
    """Eager PyTorch vs the graphs driven as transformers.js drives them, on the export sample
    (`validate.sample_batch`: two prompts, left padded). Returns the report (`passed`, `failures`).

    Float exports gate on every teacher-forced logit (`validate.TOLERANCE[dtype]`, scaled by the
    largest eager logit when above 1); int8 / int4 (`bits`) on `validate.QUANT_GATES`.
    `model`: a `PaliGemma`, or a checkpoint folder loaded for the reference and released before
    ONNX Runtime loads the graphs.
    """
    start = time.perf_counter()
    batch, _ = sample_batch(processor)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    reference = load_checkpoint(model) if isinstance(model, Path) else model
    cfg = reference.cfg
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    recorder = _Recorder(EagerStepper(reference.eval()))
    with torch.inference_mode():
        ref_tokens = generate_tokens(recorder, ids, mask, pix, max_new_tokens, eos, pad)
    recorder.stepper = None
    del reference
    gc.collect()

    stepper = TransformersJsStepper(files, cfg.image_token_id, threads)
    got = [stepper.prefill(ids, mask, pix, max_new_tokens)]
    active, ended = [np.ones(len(ids), bool)], np.zeros(len(ids), bool)
    for tokens in recorder.tokens:  # teacher forcing: both sides see the same tokens
        ended |= tokens == eos
        got.append(stepper.decode(tokens))
        active.append(~ended.copy())
    quality = logit_quality(recorder.logits, got, active)
    diffs = [float(np.abs(g[a] - r[a]).max()) if a.any() else 0.0 for g, r, a in zip(got, recorder.logits, active)]
    got_tokens = generate_tokens(stepper, ids, mask, pix, max_new_tokens, eos, pad)
    n = max(ref_tokens.shape[1], got_tokens.shape[1])
    ref_full, got_full = (np.pad(t, ((0, 0), (0, n - t.shape[1])), constant_values=pad) for t in (ref_tokens, got_tokens))

    failures = []
    if not all(np.isfinite(g).all() for g in got):
        failures.append("ONNX Runtime produced non-finite logits")
    scale = max(1.0, float(max(np.abs(x).max() for x in recorder.logits)))
    tol = TOLERANCE.get(dtype, 1e-3) * scale
    gates = None
    if bits is not None:
        gates = QUANT_GATES.get(bits, QUANT_GATES[4])
        failures += quality_failures(quality, gates)
    elif max(diffs) > tol:
        failures.append(f"max logit difference {max(diffs):.3e} > tolerance {tol:.3e}")
    return {
        "passed": not failures,
        "failures": failures,
        "dtype": dtype,
        "bits": bits,
        "sample": {"prompt_tokens": [int(x) for x in mask.sum(-1)], "padding": "left"},
        "logits_max_abs_diff": max(diffs),
        "per_step_max_abs_diff": diffs,
        "tolerance": tol,
        "quality": quality,
        "gates": gates,
        "greedy_agreement": float((ref_full == got_full).mean()),
        "eager_tokens": ref_full.tolist(),
        "transformersjs_tokens": got_full.tolist(),
        "seconds": round(time.perf_counter() - start, 3),
    }
