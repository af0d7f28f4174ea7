"""Time one training step of the demo model, CPU: attention path x bf16 autocast, side by side.

    python benchmarks/bench_train_step.py                    # 2 threads, 3 rounds of 15 steps
    python benchmarks/bench_train_step.py --threads 1 --rounds 5

A training step is what `pgexport.train.finetune` runs: `collate` (images preprocessed, text tokenized),
`training_loss` (suffix-only logits), backward, gradient clipping, AdamW. The model is a random
`demo_config()` PaliGemma (the demo's init scale), the data the synthetic shapes set, batches of
64 examples grouped by image (as examples/train_demo.py trains). Variants:

* attention: "explicit" (matmul-softmax-matmul, what `models/attention.py` does when training on
  the CPU) or "sdpa" (PyTorch's SDPA, whose CPU flash kernel has a slow backward; forced by
  setting `EXPLICIT_MAX_SCORES` to 0);
* bf16 autocast on or off;
* stage 1 (SigLIP tower frozen) and stage 2 (everything trains).

Each round runs every variant for `--steps` timed steps after 3 untimed ones, in turn, on the same
batches, so the machine's load drifts over all of them alike. Writes
benchmarks/results/train_step.json and .md: median ms per step (p10-p90 over rounds) and ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pgexport.models.attention as attention  # noqa: E402
from benchmarks.common import machine_info, save_results  # noqa: E402
from pgexport.models import PaliGemma  # noqa: E402
from pgexport.processing.processor import PaliGemmaProcessor  # noqa: E402
from pgexport.processing.tokenizer import build_paligemma_tokenizer  # noqa: E402
from pgexport.train.dataset import read_jsonl, write_dataset  # noqa: E402
from pgexport.train.demo import DEMO_BASE_VOCAB, demo_config  # noqa: E402
from pgexport.train.finetune import (  # noqa: E402
    TrainConfig, batch_order, collate, make_optimizer, set_trainable, training_loss,
)

RESULTS = Path(__file__).parent / "results" / "train_step"
WARMUP = 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant and round")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = demo_config()
    processor = PaliGemmaProcessor(build_paligemma_tokenizer(DEMO_BASE_VOCAB), image_size=cfg.vision.image_size,
                                   num_image_tokens=cfg.num_image_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, seed=0, train=200, val=0, test=0)
        train = read_jsonl(Path(tmp) / "train.jsonl")
        order = batch_order(train, 64, seed=0, epoch=0, group_by_image=True)
        batches = [collate(processor, [train[i] for i in order[j % len(order)]], "cpu")
                   for j in range(WARMUP + args.steps)]
        # collate is timed apart: it is the same work in every variant
        t = time.perf_counter()
        for j in range(args.steps):
            collate(processor, [train[i] for i in order[j % len(order)]], "cpu")
        collate_ms = (time.perf_counter() - t) / args.steps * 1e3

    variants = [(stage, attn, bf16) for stage in ("stage 1 (tower frozen)", "stage 2 (everything)")
                for attn in ("explicit", "sdpa") for bf16 in (True, False)]
    states = {}
    for v in variants:
        model = PaliGemma.random(cfg, seed=0, std=0.06)
        named = set_trainable(model, freeze_vision=v[0].startswith("stage 1"))
        states[v] = (model, named, make_optimizer(named, TrainConfig(lr=1e-3)))
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    default_limit = attention.EXPLICIT_MAX_SCORES
    for r in range(args.rounds):
        for v in variants:
            model, named, opt = states[v]
            attention.EXPLICIT_MAX_SCORES = default_limit if v[1] == "explicit" else 0
            try:
                for j, batch in enumerate(batches):
                    t = time.perf_counter()
                    loss = training_loss(model, batch, autocast=v[2])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
                    opt.step()
                    if j >= WARMUP:
                        times[v].append(time.perf_counter() - t)
            finally:
                attention.EXPLICIT_MAX_SCORES = default_limit
            print(f"round {r + 1}/{args.rounds} {v[0]}, {v[1]}, bf16 {'on' if v[2] else 'off'}: "
                  f"{np.median(times[v][-args.steps:]) * 1e3:.1f} ms/step", flush=True)

    rows, results = [], {"machine": machine_info(), "settings": vars(args), "collate_ms": round(collate_ms, 2), "variants": []}
    for v in variants:
        ms = np.asarray(times[v]) * 1e3
        base = np.median(np.asarray(times[(v[0], "explicit", True)]) * 1e3)
        entry = {"stage": v[0], "attention": v[1], "bf16": v[2], "median_ms": round(float(np.median(ms)), 2),
                 "p10_ms": round(float(np.percentile(ms, 10)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
                 "vs_explicit_bf16": round(float(np.median(ms) / base), 3)}
        results["variants"].append(entry)
        rows.append(f"| {v[0]} | {v[1]} | {'on' if v[2] else 'off'} | {entry['median_ms']:.1f} "
                    f"({entry['p10_ms']:.1f}-{entry['p90_ms']:.1f}) | {entry['vs_explicit_bf16']:.2f}x |")
    md = "\n".join([
        f"Training step of the demo model (batch 64 grouped by image, {args.threads} thread(s), "
        f"{args.rounds} rounds x {args.steps} steps per variant, interleaved); forward + backward + clip + AdamW, "
        f"collate excluded ({collate_ms:.1f} ms per batch, the same in every variant).", "",
        "| stage | attention | bf16 autocast | ms per step, median (p10-p90) | vs explicit + bf16 |",
        "|---|---|---|---|---|", *rows])
    save_results(args.out, results, md, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
