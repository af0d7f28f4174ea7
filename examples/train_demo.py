"""Train the built-in demo model from scratch on the synthetic shapes data (CPU).

    python examples/train_demo.py                   # writes pgexport/assets/demo/ (19 min, 2 cores)
    python examples/train_demo.py --frozen-steps 100 --steps 100 --out /tmp/demo-try   # a quick trial
    python examples/train_demo.py --from pgexport/assets/demo --steps 700 --stage2-lr 3e-4   # continue (see --from)

The shipped model was trained from scratch by the first command (bf16 autocast on an
AVX512-BF16 CPU), then continued with `--from` when the data learned to ask for absent shapes
(four runs, float32); its figures are in training.json and docs/finetuning.md.

Steps: generate the dataset (seed 0), build a random `demo_config()` PaliGemma with the
512-token stand-in tokenizer, then train in three stages, as PaliGemma starts from a separately
pretrained SigLIP:
  0. `pretrain_vision_`: the SigLIP tower alone, supervised on what each grid cell holds;
  1. the projector and decoder learn to read the frozen tower (`pgexport.train.finetune`, the recipe of
     `pgexport finetune`, with freeze_vision);
  2. everything trains, the tower at a lower lr (vision_lr_scale).
With `--from MODEL_DIR` the stages 0 and 1 are skipped: training continues from that model's
weights with stage 2 alone (its own warm-up and cosine decay, `--steps` at `--stage2-lr`), which is
how a trained demo model learns a change of the data mix (new answers) in a fraction of the time
of a run from scratch. Then evaluate on a fresh test set drawn with another seed (1234) and write the model in the
Hugging Face layout plus a few sample images. Everything is seeded; on another machine the
numbers can differ in the last digits (floating-point summation order).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pgexport.models import PaliGemma
from pgexport.models.checkpoint import load_checkpoint, save_checkpoint
from pgexport.processing.image import preprocess_images
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.processing.tokenizer import build_paligemma_tokenizer
from pgexport.train.dataset import COLOURS, SHAPES, cell_labels, cell_pooling, make_examples, read_jsonl, render, write_dataset
from pgexport.train.demo import DEMO_BASE_VOCAB, DEMO_DIR, demo_config
from pgexport.train.finetune import TrainConfig, evaluate, finetune, native_bf16

TEST_SEED = 1234  # the fresh test set: another seed than the training data


def smooth_loc_embeddings_(model: PaliGemma, std: float = 0.02) -> None:
    """Initialise the 1024 `<locNNNN>` embeddings with sinusoids of the bin index, so that
    neighbouring bins start with similar embeddings (and, through the tied head, similar logits).
    A random init makes every bin an unrelated class, which a small model learns far slower."""
    cfg = model.cfg
    first_loc = DEMO_BASE_VOCAB
    d = cfg.text.hidden_size
    pos = torch.arange(1024, dtype=torch.float64)[:, None] / 1023  # [1024, 1] in [0, 1]
    freqs = torch.logspace(0, 2.5, d // 2, dtype=torch.float64)[None] * torch.pi  # 1 .. ~316 half-turns
    table = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=1)  # unit-variance-ish
    table = table / table.std() * std
    with torch.no_grad():
        model.language_model.embed_tokens.weight[first_loc:first_loc + 1024] = table.to(torch.float32)


def sincos_position_embeddings_(model: PaliGemma, rms: float = 1.0) -> None:
    """Initialise SigLIP's learned position embeddings with a 2-D sine-cosine code of the patch's
    (row, column), as MAE does. With N(0, std) init the position signal is ~25x weaker than the
    patch content, and the small model takes thousands of steps to learn where things are."""
    emb = model.vision_tower.embeddings.position_embedding.weight  # [N, D]
    side, d = int(round(emb.shape[0] ** 0.5)), emb.shape[1]
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    freqs = 1.0 / (side ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4)))  # [D/4] from 1 to ~1/side
    parts = [f(c.reshape(-1, 1) * freqs * torch.pi / 2) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)  # [N, D]
    table = table / table.pow(2).mean().sqrt() * rms
    with torch.no_grad():
        emb.copy_(table.to(emb.dtype))


def pretrain_vision_(model: PaliGemma, seed: int, num_images: int, steps: int, batch_size: int = 32,
                     lr: float = 2e-3, progress=print) -> dict:
    """Stage 0: teach the SigLIP tower to see before it meets the decoder.

    PaliGemma starts from a SigLIP encoder that was pretrained on its own. A tower trained only
    through the decoder's next-token loss learns shape identity slowly here (the gradient reaches
    it through the decoder, from a few shape words per caption), so it is first pretrained like
    the original ViT, supervised, with throw-away heads on its output tokens:
    * per 3 x 3 grid cell (the mean of the tokens whose patch centre lies in the cell): what the
      cell holds (nothing or one of the four shapes; nothing or one of the six colours) and the
      shape's box (x0, y0, x1, y1 in [0, 1], L1 loss, where there is a shape);
    * per token: its own row and column in the patch grid, so the output tokens keep where they
      are (the decoder reads positions from them). With the tower frozen afterwards, "where
      is ...?" answers did not improve with or without this target; training the tower again in
      stage 2 is what fixed them, so this target is a cheap precaution, not a cure.
    The scenes are the training split's (regenerated from the seed: the same pixels as the PNGs).
    Returns the last step's figures."""
    tower = model.vision_tower
    cfg = model.cfg.vision
    side = cfg.image_size // cfg.patch_size
    pool = torch.from_numpy(cell_pooling(side))  # [cells, patches]: cell features = pool @ tokens
    n_shape, n_colour = 1 + len(SHAPES), 1 + len(COLOURS)
    cell_head = torch.nn.Sequential(torch.nn.LayerNorm(cfg.hidden_size),
                                    torch.nn.Linear(cfg.hidden_size, n_shape + n_colour + 4))
    token_head = torch.nn.Linear(cfg.hidden_size, 2 * side)
    where = torch.arange(side * side)
    token_rc = torch.stack([where // side, where % side])  # [2, N] row, column of every token
    params = list(tower.parameters()) + list(cell_head.parameters()) + list(token_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scenes = [scene for scene, _ in make_examples(seed, num_images, "train")]
    rng = np.random.default_rng(seed)
    tower.train()
    for step in range(1, steps + 1):
        for g in opt.param_groups:  # warm-up 50 steps, cosine to 2%
            g["lr"] = lr * min(1.0, step / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        batch = [scenes[i] for i in rng.choice(len(scenes), batch_size, replace=False)]
        pixels = torch.from_numpy(preprocess_images([render(s) for s in batch], cfg.image_size))
        shape, colour, box = (torch.from_numpy(v) for v in cell_labels(batch).values())  # [B, cells(, 4)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16(torch.device("cpu"))):
            tokens = tower(pixels)  # [B, N, D]
            cells = cell_head(pool @ tokens.float()).float()  # [B, 9, shapes + colours + 4]
            rc = token_head(tokens).float()  # [B, N, 2 * side]
        present = shape > 0
        loss = (F.cross_entropy(cells[..., :n_shape].reshape(-1, n_shape), shape.reshape(-1))
                + F.cross_entropy(cells[..., n_shape:n_shape + n_colour].reshape(-1, n_colour), colour.reshape(-1))
                + 10 * F.l1_loss(cells[..., -4:][present], box[present])
                + F.cross_entropy(rc.reshape(-1, side, 2).transpose(1, 2).reshape(-1, side),
                                  token_rc.T.reshape(1, -1).expand(batch_size, -1).reshape(-1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            accuracy = (cells[..., :n_shape].argmax(-1)[present] == shape[present]).float().mean().item()
            box_error = (cells[..., -4:][present] - box[present]).abs().mean().item() * cfg.image_size
            progress(f"vision pretraining step {step}/{steps} loss {loss.item():.4f} shape accuracy {accuracy:.3f} "
                     f"box error {box_error:.1f} px (this batch)")
    opt.zero_grad(set_to_none=True)
    return {"steps": steps, "batch_size": batch_size, "loss": round(loss.item(), 4),
            "shape_accuracy_last_batch": round(accuracy, 4), "box_error_px_last_batch": round(box_error, 2)}


def write_samples(samples: Path, inherited: Path | None) -> None:
    """The sample images shipped with a model, and scenes.json: the shapes and boxes each holds
    (the tests check the model's detections against it). Samples already in the output folder
    stay, a continued model keeps those of the model it continued from, and a new folder gets the
    first scenes of seed 7's test split."""
    if (samples / "scenes.json").is_file():
        return
    if inherited is not None and (inherited / "scenes.json").is_file():
        shutil.copytree(inherited, samples, dirs_exist_ok=True)
        return
    samples.mkdir(exist_ok=True)
    scenes = {}
    for i, (scene, _) in enumerate(make_examples(seed=7, num_images=4, split="test")):
        render(scene).save(samples / f"shapes_{i}.png")
        scenes[f"shapes_{i}.png"] = [{"shape": s.shape, "colour": s.colour, "box": list(s.box)} for s in scene.shapes]
    (samples / "scenes.json").write_text(
        "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in scenes.items()) + "\n}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEMO_DIR), help="model folder to write (default: the packaged demo)")
    ap.add_argument("--work", default=None, help="folder for the dataset and checkpoints (default: a temp dir)")
    ap.add_argument("--train-images", type=int, default=12000)
    ap.add_argument("--val-images", type=int, default=60)
    ap.add_argument("--test-images", type=int, default=100, help="images of the fresh test set (seed 1234)")
    ap.add_argument("--steps", type=int, default=3500, help="stage 2 steps (everything trains)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--init-std", type=float, default=0.06,
                    help="std of the random initial weights (0.02, usual for wide models, leaves this narrow "
                         "model ignoring the image for hundreds of steps)")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                    help="dtype of the saved weights (float16: 4 MB; float32 would be 8.2 MB, over the 8 MB budget)")
    ap.add_argument("--pos-init", default="sincos", choices=["sincos", "random"],
                    help="initial vision position embeddings (see sincos_position_embeddings_)")
    ap.add_argument("--group-by-image", type=int, default=1,
                    help="1: a batch holds all tasks of a few images (each encoded once); 0: one row per image")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--bf16", type=int, default=None, help="1/0: bf16 autocast on/off (default: where native)")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vision-pretrain-steps", type=int, default=1200,
                    help="stage 0 steps (32 images each) of supervised vision pretraining; 0 to skip")
    ap.add_argument("--frozen-steps", type=int, default=2500,
                    help="stage 1 steps with the pretrained tower fixed (the decoder learns to read it)")
    ap.add_argument("--stage2-lr", type=float, default=1e-3, help="peak lr of stage 2 (everything trains)")
    ap.add_argument("--vision-lr-scale", type=float, default=0.3, help="the tower's lr in stage 2, relative to --stage2-lr")
    ap.add_argument("--caption-weight", type=int, default=1,
                    help="each caption example appears this many times in the training mix (captions carry the "
                         "articles, 'an orange'; the other tasks once)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="with --from: keep the SigLIP tower fixed (the projector and decoder train)")
    ap.add_argument("--from", dest="from_model", default=None, metavar="MODEL_DIR",
                    help="continue from this trained model (stage 2 only: --steps at --stage2-lr) instead of "
                         "training from scratch")
    args = ap.parse_args(argv)
    if args.from_model and not (Path(args.from_model) / "config.json").is_file():
        ap.error(f"--from {args.from_model}: no config.json there; pass a model folder such as pgexport/assets/demo")
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.time(), time.process_time()  # wall, and CPU (user + sys, every thread) of this process

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pgexport-demo-"))
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        write_dataset(data, seed=args.seed, train=args.train_images, val=args.val_images, test=0, progress=print)
    train_file = data / "train.jsonl"
    if args.caption_weight > 1:  # the data mix: captions repeated, everything else once
        lines = train_file.read_text().splitlines()
        mixed = [line for line in lines for _ in range(args.caption_weight if json.loads(line)["task"] == "caption" else 1)]
        train_file = data / f"train_captions_x{args.caption_weight}.jsonl"
        train_file.write_text("\n".join(mixed) + "\n")
    stage0 = None
    if args.from_model:  # weights and processor of the trained model; stage 2 alone continues from them
        model = load_checkpoint(args.from_model, dtype=torch.float32)
        processor = PaliGemmaProcessor.from_pretrained(args.from_model)
        args.vision_pretrain_steps = args.frozen_steps = 0
    else:
        model_cfg = demo_config(args.image_size, args.patch_size, args.kv_heads)
        processor = PaliGemmaProcessor(build_paligemma_tokenizer(DEMO_BASE_VOCAB), image_size=model_cfg.vision.image_size,
                                       num_image_tokens=model_cfg.num_image_tokens)
        model = PaliGemma.random(model_cfg, seed=args.seed, std=args.init_std)
        smooth_loc_embeddings_(model)
        if args.pos_init == "sincos":
            sincos_position_embeddings_(model)
    if args.vision_pretrain_steps:
        stage0 = pretrain_vision_(model, args.seed, args.train_images, args.vision_pretrain_steps)
    # Stage 1 (frozen tower) then stage 2 (everything, the tower at a lower lr): the same recipe
    # as `pgexport finetune`, run twice, each with its own warm-up and cosine decay.
    stages = [("stage 1: decoder reads the fixed tower", args.frozen_steps, args.lr, True, 0),
              ("stage 2: everything trains" if not args.freeze_vision else "stage 2: the tower fixed",
               args.steps, args.stage2_lr, args.freeze_vision, 1)]
    for name, steps, lr, frozen, seed_offset in stages:
        if not steps:
            continue
        print(f"{name}: {steps} steps")
        cfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=lr, weight_decay=0.01,
                          warmup_steps=50, min_lr_ratio=0.02, seed=args.seed + seed_offset, log_every=20,
                          group_by_image=bool(args.group_by_image), freeze_vision=frozen,
                          vision_lr_scale=args.vision_lr_scale, eval_every=max(steps // 4, 1), eval_examples=150,
                          max_new_tokens=40, device=args.device, bf16=None if args.bf16 is None else bool(args.bf16))
        model = finetune(model, train_file, work / ("run-frozen" if seed_offset == 0 else "run"),
                         val_data=data / "val.jsonl", processor=processor, config=cfg)["model"]
    train_seconds, train_cpu_seconds = time.time() - t0, time.process_time() - cpu0

    # Fresh test set from another seed; no scene of the training data may reappear.
    test_dir = work / "test"
    if not (test_dir / "test.jsonl").is_file():
        write_dataset(test_dir, seed=TEST_SEED, train=0, val=0, test=args.test_images)
    model = model.eval().float().to("cpu")
    if args.dtype != "float32":  # evaluate exactly the weights that are shipped (rounded, used in float32)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, args.dtype)).float())
    metrics, counts, _ = evaluate(model, processor, read_jsonl(test_dir / "test.jsonl"), batch_size=64,
                                  max_new_tokens=40, return_predictions=True)
    print("fresh test set (seed %d): " % TEST_SEED + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    if args.dtype != "float32":
        save_checkpoint(model.to(getattr(torch, args.dtype)), out)  # exact: the values are already rounded
    else:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(run / name, out / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        shutil.copy(run / name, out / name)
    write_samples(out / "samples", Path(args.from_model) / "samples" if args.from_model else None)
    (out / "training.json").write_text(json.dumps({
        "command": "python examples/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "continued_from": args.from_model,
        "previous_training": (json.loads((Path(args.from_model) / "training.json").read_text())
                              if args.from_model and (Path(args.from_model) / "training.json").is_file() else None),
        "vision_pretrain_steps": args.vision_pretrain_steps, "frozen_steps": args.frozen_steps, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "stage2_lr": args.stage2_lr,
        "vision_lr_scale": args.vision_lr_scale, "freeze_vision": args.freeze_vision, "train_images": args.train_images,
        "caption_weight": args.caption_weight, "train_examples": len(read_jsonl(train_file)), "train_minutes": round(train_seconds / 60, 1),
        "train_cpu_minutes": round(train_cpu_seconds / 60, 1),
        "vision_pretraining": stage0, "weights_dtype": args.dtype, "test_seed": TEST_SEED, "test_counts": counts,
        "test_metrics": {k: round(v, 4) for k, v in metrics.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2) + "\n")
    print(f"wrote {out} in {(time.time() - t0) / 60:.1f} min (training {train_seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
