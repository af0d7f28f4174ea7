"""Task-level accuracy of an export against the eager model (quantization gates on real data).

    >>> from pgexport.train.evaluate import task_accuracy, teacher_forced_agreement
    >>> task_accuracy(OnnxPaliGemma("exports/demo-int4"), records)  # doctest: +SKIP
    {'caption': 0.98, ..., 'exact_match': 0.95, 'detect_iou': 0.81, 'detect_recall': 0.97, 'detect_fp_rate': 0.0}

`records` are `pgexport.train.dataset.Example`s (e.g. `read_jsonl("shapes/test.jsonl")`). Used by
`benchmarks/eval_quant_demo.py` and the demo-model gates of `tests/test_demo_quantization.py`.
"""

from __future__ import annotations

import numpy as np

from pgexport.runtime.quality import logit_quality
from pgexport.train.dataset import task_metrics

# The demo-model gates' test set (tests/test_demo_quantization.py, benchmarks/eval_quant_demo.py): the
# shapes dataset of this seed, as many images. Its first 100 are the demo's held-out set
# (examples/train_demo.py); 500 give 1941 exact-match answers, so one flipped answer is 0.05
# points (on 100 images it is 0.26, and a 0.5-point gate is two answers).
DEMO_EVAL_SEED = 1234
DEMO_EVAL_IMAGES = 500


def task_accuracy(rt, records, batch_size: int = 64, max_new_tokens: int = 40) -> dict:
    """Greedy outputs of `rt` (anything with `generate(images, prompts, max_new_tokens)`, e.g.
    `OnnxPaliGemma`) scored like `pgexport.train.finetune.evaluate` (`task_metrics`): {task: score,
    "exact_match": mean over the non-detect examples, "detect_iou" and "detect_recall" over the
    detect prompts for present shapes, "detect_fp_rate": share of the prompts for absent shapes
    answered with a box}; a metric without examples is None."""
    predictions = []
    order = sorted(range(len(records)), key=lambda i: (records[i].task, i))
    for start in range(0, len(order), batch_size):
        chunk = [records[i] for i in order[start:start + batch_size]]
        texts = rt.generate([r.image for r in chunk], [r.prefix for r in chunk], max_new_tokens=max_new_tokens)
        predictions += zip(chunk, texts)
    metrics, _ = task_metrics(predictions)
    for key in ("exact_match", "detect_iou", "detect_recall", "detect_fp_rate"):
        metrics.setdefault(key, None)
    return metrics


def teacher_forced_logits(stepper, processor, records, eos: int, pad: int, batch_size: int = 64):
    """Per batch: list of (logits [B, V], active [B]) over prompt end + every gold answer token."""
    out = []
    order = sorted(range(len(records)), key=lambda i: (records[i].task, i))
    for start in range(0, len(order), batch_size):
        chunk = [records[i] for i in order[start:start + batch_size]]
        batch = processor(images=[r.image for r in chunk], prompts=[r.prefix for r in chunk])
        answers = [processor.tokenizer.encode(r.suffix, add_special_tokens=False).ids + [eos] for r in chunk]
        steps = max(map(len, answers))
        logits = [np.asarray(stepper.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], steps + 1))]
        active = [np.ones(len(chunk), bool)]
        for t in range(steps - 1):  # feed answer token t, predict token t + 1
            tokens = np.array([a[t] if t < len(a) else pad for a in answers], np.int64)
            logits.append(np.asarray(stepper.decode(tokens)))
            active.append(np.array([t + 1 < len(a) for a in answers]))
        out.append((logits, active))
    return out


def teacher_forced_agreement(reference_stepper, stepper, processor, records, eos: int, pad: int,
                             reference: list | None = None) -> dict:
    """`logit_quality` (top-1 agreement, KL, cosine) of `stepper` against `reference_stepper`, both
    fed the prompt and then every gold answer token (eos included). `reference`: the reference's
    `teacher_forced_logits` on the same records, when already computed (it is then not run).

    >>> teacher_forced_agreement(EagerStepper(model), rt.stepper(), processor, records, eos, pad)  # doctest: +SKIP
    {'top1_agreement': 0.99, ...}
    """
    ref = reference if reference is not None else teacher_forced_logits(reference_stepper, processor, records, eos, pad)
    got = teacher_forced_logits(stepper, processor, records, eos, pad)
    return logit_quality(*paired_steps(ref, got))


def paired_steps(reference: list, got: list) -> tuple[list, list, list]:
    """Two `teacher_forced_logits` results on the same records, flattened to the per-step lists
    `logit_quality` takes: (reference logits, logits, active rows)."""
    ref_l, got_l, act = [], [], []
    for (rl, ra), (gl, _) in zip(reference, got):
        ref_l += rl
        got_l += gl
        act += ra
    return ref_l, got_l, act
