"""How fast a small SigLIP tower learns shape identity, by shape size (why the dataset's shapes
fill 0.70-0.95 of their grid cell).

    python benchmarks/probe_shape_sizes.py                  # 600 steps per setting
    python benchmarks/probe_shape_sizes.py --sides 0.5-0.85,0.6-0.95,0.7-0.95 --steps 600

For each range of shape sides (a fraction of the 3 x 3 grid cell, `pgexport.train.dataset.SIDE`) a
fresh demo-sized tower (4 x 128, 112 px, 14-px patches, the demo's init) with a linear head on
the mean of its output tokens over each cell is trained to classify what each cell holds
(nothing or one of the four shapes), on freshly rendered scenes, and scored on 200 held-out
scenes: shape accuracy over the cells that hold a shape. Same seeds for every setting. Writes
benchmarks/results/probe_shape_sizes.json and .md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pgexport.train.dataset as dataset  # noqa: E402
from benchmarks.common import machine_info, save_results  # noqa: E402
from pgexport.models.siglip import SiglipVisionTower  # noqa: E402
from pgexport.processing.image import preprocess_images  # noqa: E402
from pgexport.train.demo import demo_config  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "probe_shape_sizes"


def batch(rng, n, size):
    scenes = [dataset.random_scene(rng) for _ in range(n)]
    pixels = torch.from_numpy(preprocess_images([dataset.render(s) for s in scenes], size))
    return pixels, torch.from_numpy(dataset.cell_labels(scenes)["shape"])  # [B, cells]: 0 = empty


def probe(side: tuple[float, float], steps: int, batch_size: int, lr: float, std: float, every: int) -> list[dict]:
    dataset.SIDE = side  # the generator reads the module constant
    cfg = demo_config().vision
    torch.manual_seed(0)
    tower = SiglipVisionTower(cfg)
    for p in tower.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)  # the demo's init scale (examples/train_demo.py --init-std)
    pool = torch.from_numpy(dataset.cell_pooling(cfg.image_size // cfg.patch_size))  # [cells, patches]
    head = torch.nn.Sequential(torch.nn.LayerNorm(cfg.hidden_size), torch.nn.Linear(cfg.hidden_size, 1 + len(dataset.SHAPES)))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng, test_rng = np.random.default_rng(0), np.random.default_rng(99)
    test = [batch(test_rng, 100, cfg.image_size) for _ in range(2)]
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1, step / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pixels, labels = batch(rng, batch_size, cfg.image_size)
        logits = head(pool @ tower(pixels))  # [B, cells, 5]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            tower.eval()
            right = total = 0
            with torch.no_grad():
                for px, y in test:
                    pred = head(pool @ tower(px)).argmax(-1)
                    right += int((pred[y > 0] == y[y > 0]).sum())
                    total += int((y > 0).sum())
            tower.train()
            curve.append({"step": step, "shape_accuracy": round(right / total, 4), "seconds": round(time.time() - t0, 1)})
            print(f"side {side}: step {step} shape accuracy {right / total:.3f}", flush=True)
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="0.5-0.85,0.7-0.95", help="comma-separated LO-HI ranges")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init-std", type=float, default=0.06)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sides = [tuple(float(x) for x in s.split("-")) for s in args.sides.split(",")]
    results = {"machine": machine_info(), "settings": vars(args), "curves": {}}
    for side in sides:
        results["curves"][f"{side[0]:.2f}-{side[1]:.2f}"] = probe(side, args.steps, args.batch_size, args.lr,
                                                                  args.init_std, max(args.steps // 6, 1))
    steps = [p["step"] for p in next(iter(results["curves"].values()))]
    lines = [f"Per-cell shape accuracy of a demo-sized SigLIP probe ({args.batch_size} scenes a step, lr {args.lr}, "
             f"{args.threads} thread(s)), held-out 200 scenes.", "",
             "| shape side (of the cell) | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, curve in results["curves"].items():
        lines.append(f"| {name} | " + " | ".join(f"{p['shape_accuracy']:.3f}" for p in curve) + " |")
    save_results(args.out, results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
