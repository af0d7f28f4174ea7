"""Fine-tuning recipe: prefix-LM loss on the suffix, AdamW, warm-up + cosine, resumable.

    >>> from pgexport.train.finetune import TrainConfig, finetune
    >>> finetune("paligemma-tiny", "shapes/train.jsonl", "out", val_data="shapes/val.jsonl",
    ...          config=TrainConfig(epochs=1, lr=1e-3, batch_size=8))  # doctest: +SKIP

What one step does:

* the processor builds `<image>*N <bos> prefix \\n suffix <eos>` with `token_type_ids` 0 on the
  prefix (bidirectional attention) and 1 on the suffix (causal), and `labels` equal to the
  suffix ids and -100 on the prefix and the padding;
* the model runs under the prefix-LM mask; logits at position t predict the token at t + 1, so
  logits `[:, :-1]` are scored against labels `[:, 1:]` (the last prefix token, "\\n", predicts
  the first suffix token); the cross-entropy is the mean over suffix tokens only;
* AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient clipping,
  bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX; `bf16=False` turns it off).

Checkpoints (`OUT/checkpoint/`) hold the model (`model.safetensors` + `config.json`, the layout
`load_checkpoint` reads), the AdamW moments (`optimizer.safetensors`) and everything else as JSON
(`trainer_state.json`: step, hyperparameters, the names of the trained parameters). Nothing is
pickled and nothing is read with `torch.load`. The learning rate is a pure function of the step,
and the data order a pure function of (seed, epoch), so a resumed run takes exactly the steps
the uninterrupted run would have taken.

The finished model goes to `OUT/` in the Hugging Face layout (config.json, model.safetensors,
tokenizer.json, preprocessor_config.json): every other `pgexport` command takes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pgexport.eager.generate import generate_text
from pgexport.eager.loading import load_model, load_processor, resolve_device
from pgexport.errors import PgExportError
from pgexport.files import move_into_place, staging_folder
from pgexport.machine import cpu_flags
from pgexport.models.checkpoint import load_checkpoint, save_checkpoint
from pgexport.processing.image import preprocess_images
from pgexport.train.dataset import Example, read_jsonl, task_metrics

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # default: 5% of the steps (at least 1)
    weight_decay: float = 0.0  # AdamW decay on >= 2-D parameters only
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    freeze_vision: bool = False  # keep the SigLIP tower fixed (the projector still trains)
    vision_lr_scale: float = 1.0  # the SigLIP tower's lr = lr * this (< 1: a pretrained tower adapts without being wiped)
    freeze_embeddings: bool = False  # keep the (tied) token embedding / LM head fixed
    seed: int = 0  # data order
    group_by_image: bool = False  # batches hold all examples of a few images; each image is encoded once
    log_every: int = 10
    eval_every: int | None = None  # steps between validations (default: at the end only)
    eval_examples: int = 200  # validation examples used (a fixed, evenly spread subset)
    save_every: int | None = None  # steps between checkpoints (default: eval_every, and the end)
    max_new_tokens: int = 48  # for validation generation
    device: str = "cpu"
    bf16: bool | None = None  # bf16 autocast (fp32 master weights); None: on CUDA and on CPUs with native bf16

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---------------------------------------------------------------------------- pieces
def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits the loss scores and their targets: labels `[B, S]` have -100 on
    the prefix and padding, and position t's logits predict the token at t + 1. Returns
    (mask `[B, S]` bool, targets `[n]`), targets in the mask's row-major order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask, labels[:, 1:][mask[:, :-1]]


def suffix_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the suffix: logits `[B, S, V]`, labels `[B, S]` with
    -100 on the prefix and padding (see `scored_positions`)."""
    mask, targets = scored_positions(labels.to(logits.device))
    return F.cross_entropy(logits[mask].float(), targets)


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of update number `step` (0-based): linear warm-up, then cosine decay."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def own_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter its own writable memory.

    `load_checkpoint` memory-maps the safetensors file, so parameters may be views of the
    mapped file; an in-place optimizer update must not touch (or fault on) that mapping.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for name, b in list(model.named_buffers()):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, attr, b.clone())
    return model


def set_trainable(model, freeze_vision: bool = False, freeze_embeddings: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """Mark parameters trainable or frozen; returns the trainable ones (name, parameter)."""
    out = []
    for name, p in model.named_parameters():
        frozen = (freeze_vision and name.startswith("vision_tower.")) or (freeze_embeddings and "embed_tokens" in name)
        p.requires_grad_(not frozen)
        if not frozen:
            out.append((name, p))
    return out


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for vision in (False, True):
        part = [(n, p) for n, p in named if n.startswith("vision_tower.") == vision]
        scale = cfg.vision_lr_scale if vision else 1.0
        groups += [{"params": [p for _, p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for _, p in part if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    # foreach=False: the same per-parameter arithmetic whatever the device, so resumed runs are exact.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def collate(processor, records: list[Example], device) -> dict[str, torch.Tensor]:
    """A training batch (right padding) on `device`. Each distinct image is preprocessed (and
    later encoded) once: `pixel_values` holds the distinct images, `image_index` [B] says which
    one each row uses."""
    paths = list(dict.fromkeys(r.image for r in records))
    where = {p: i for i, p in enumerate(paths)}
    batch = processor(images=[paths[0]], prompts=[r.prefix for r in records],
                      suffixes=[r.suffix for r in records], padding_side="right", return_tensors="pt")
    if len(paths) > 1:
        batch["pixel_values"] = torch.from_numpy(preprocess_images(paths, processor.image_size, processor.mean,
                                                                   processor.std, processor.resample))
    else:
        batch["pixel_values"] = batch["pixel_values"][:1]
    batch["image_index"] = torch.tensor([where[r.image] for r in records])
    return {k: v.to(device) for k, v in batch.items()}


def batch_order(records: list[Example], batch_size: int, seed: int, epoch: int, group_by_image: bool = False) -> list[np.ndarray]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into `batch_size`
    rows (the last partial batch is dropped when there is more than one batch). With
    `group_by_image` the images are permuted and each image's examples stay together."""
    rng = np.random.default_rng([seed, epoch])
    if group_by_image:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(r.image, []).append(i)
        keys = list(groups)
        perm = np.array([i for k in rng.permutation(len(keys)) for i in groups[keys[k]]], dtype=np.int64)
    else:
        perm = rng.permutation(len(records))
    n = max(1, len(records) // batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n)]


def native_bf16(device: torch.device) -> bool:
    """CUDA, or a CPU whose instructions compute in bf16 (AVX512-BF16 or AMX): there bf16 autocast
    is faster than fp32 (benchmarks/bench_train_step.py measures by how much)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def training_loss(model, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    """Mean suffix cross-entropy of a `collate` batch (or a plain processor batch); `autocast`:
    bf16 autocast on the model's device (the loss itself is computed in fp32)."""
    device_type = batch["input_ids"].device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else _nullcontext()
    with ctx:
        features = model.encode_image(batch["pixel_values"].to(model.dtype))
        if "image_index" in batch:
            features = features[batch["image_index"]]
        # Only the positions that predict a suffix token need logits (the head is the widest matmul).
        scored, targets = scored_positions(batch["labels"])
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], image_features=features, logits_at=scored)  # [n, V]
    return F.cross_entropy(logits.float(), targets)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, processor, records: list[Example], batch_size: int = 32, max_new_tokens: int = 48,
             return_predictions: bool = False):
    """Greedy-decode every record and score it (`pgexport.train.dataset.task_metrics`): exact match
    per question/caption task, IoU and recall for `detect`, the false-positive rate of detect
    prompts for absent objects. Returns {task: score, "exact_match", "detect_iou", "detect_recall",
    "detect_fp_rate"} (each only where the records have such examples)."""
    was_training = model.training
    model.eval()
    predictions = []
    # Group by task so a batch's prompts and answers have similar lengths.
    order = sorted(range(len(records)), key=lambda i: (records[i].task, i))
    for start in range(0, len(order), batch_size):
        chunk = [records[i] for i in order[start:start + batch_size]]
        texts = generate_text(model, processor, [r.image for r in chunk], [r.prefix for r in chunk], max_new_tokens=max_new_tokens)
        predictions += zip(chunk, texts)
    model.train(was_training)
    metrics, counts = task_metrics(predictions)
    return (metrics, counts, predictions) if return_predictions else metrics


def spread_subset(records: list[Example], n: int) -> list[Example]:
    """At most `n` records, evenly spaced (deterministic)."""
    if len(records) <= n:
        return records
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


# ---------------------------------------------------------------------------- checkpoints
def save_training_state(folder: Path, model, optimizer, named, step: int, total_steps: int, cfg: TrainConfig,
                        extra: dict | None = None) -> None:
    """Write a resumable checkpoint into `folder` (replaced atomically)."""
    tmp = staging_folder(folder)
    try:
        save_checkpoint(model, tmp)
        sd = optimizer.state_dict()
        tensors = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{idx}.{key}"] = t.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
        state = {"step": step, "total_steps": total_steps, "config": cfg.to_json(),
                 "param_names": [n for n, _ in named], "param_groups": groups, **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_training_state(folder: Path, optimizer, named) -> dict:
    """Restore AdamW state from a checkpoint folder (the model is loaded separately); returns the JSON state."""
    state = json.loads((Path(folder) / STATE_FILE).read_text())
    names = [n for n, _ in named]
    if state["param_names"] != names:
        raise PgExportError(f"{folder} was saved with other trainable parameters (different --freeze-* options "
                            "or model); resume with the same settings or start a new --out")
    tensors = load_file(str(Path(folder) / OPTIMIZER_FILE), device="cpu")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    for g, saved in zip(groups, state["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return state


# ---------------------------------------------------------------------------- the loop
def finetune(model, data: str | Path | list[Example], out: str | Path, val_data=None, processor=None,
             config: TrainConfig | None = None, resume: bool = False, stop_at_step: int | None = None,
             progress: Callable[[str], None] = print) -> dict:
    """Train `model` (a checkpoint folder, a preset name, or a `PaliGemma`) on `data` and write
    the result to `out`. Returns {"step", "loss", "metrics", "seconds"}.

    With `resume=True` and a checkpoint in `OUT/checkpoint/`, training continues from it: the
    weights, AdamW moments and step come from the checkpoint, the data order and learning rate
    follow from the step. `stop_at_step=N` stops after update N with a checkpoint written (the
    schedule still spans the full run), for training in several sittings; the model folder is
    then not written and the result has `"stopped": True`.
    """
    cfg = config or TrainConfig()
    out = Path(out)
    device = resolve_device(cfg.device)
    # The whole data set is checked (every line, every image opened) before anything is written.
    train = data if isinstance(data, list) else read_jsonl(data, check_images=True)
    val = (val_data if isinstance(val_data, list) else read_jsonl(val_data, check_images=True)) if val_data is not None else None
    if processor is None:
        if isinstance(model, (str, Path)):
            processor = load_processor(model)
        else:
            raise PgExportError("pass processor= along with a model object")
    ckpt = out / CHECKPOINT_DIR
    resuming = resume and (ckpt / STATE_FILE).is_file()
    if resuming:
        progress(f"resuming from {ckpt}")
        model = load_checkpoint(ckpt, dtype=torch.float32)
    elif isinstance(model, (str, Path)):
        model = load_model(model, dtype="float32")
    model = own_parameters(model).to(device).train()

    named = set_trainable(model, cfg.freeze_vision, cfg.freeze_embeddings)
    optimizer = make_optimizer(named, cfg)
    start = 0
    if resuming:
        start = load_training_state(ckpt, optimizer, named)["step"]

    steps_per_epoch = len(batch_order(train, cfg.batch_size, cfg.seed, 0, cfg.group_by_image))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))
    save_every = cfg.save_every or cfg.eval_every
    autocast = native_bf16(device) if cfg.bf16 is None else bool(cfg.bf16)
    trainable = [p for _, p in named]
    n_train = sum(p.numel() for p in trainable)
    progress(f"training {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters on {len(train)} examples: "
             f"{total} steps of {cfg.batch_size} ({total / steps_per_epoch:.2f} epochs), lr {cfg.lr:g}, warm-up {warmup}, "
             f"device {device}{' (bf16 autocast)' if autocast else ''}")
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "a")
    t0, losses, metrics, loss_value = time.time(), [], {}, float("nan")
    epoch_batches: tuple[int, list] = (-1, [])
    try:
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch_batches[0] != epoch:
                epoch_batches = (epoch, batch_order(train, cfg.batch_size, cfg.seed, epoch, cfg.group_by_image))
            batch = collate(processor, [train[i] for i in epoch_batches[1][index]], device)
            lr = lr_at(step, total, cfg.lr, warmup, cfg.min_lr_ratio)
            for g in optimizer.param_groups:  # lr_scale: see TrainConfig.vision_lr_scale
                g["lr"] = lr * g.get("lr_scale", 1.0)
            loss = training_loss(model, batch, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
            optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise PgExportError(f"the loss became {loss_value} at step {step + 1}; lower --lr")
            losses.append(loss_value)
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                rate = (done - start) / (time.time() - t0)
                mean = float(np.mean(losses[-cfg.log_every:]))
                progress(f"step {done}/{total} epoch {done / steps_per_epoch:.2f} loss {mean:.4f} lr {lr:.2e} "
                         f"grad-norm {float(grad_norm):.2f} {rate:.2f} step/s eta {(total - done) / rate / 60:.1f} min")
                log.write(json.dumps({"step": done, "loss": mean, "lr": lr, "grad_norm": float(grad_norm),
                                      "seconds": time.time() - t0}) + "\n")
                log.flush()
            if val and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                metrics = _validate(model, processor, val, cfg, done, progress, log)
            if save_every and done % save_every == 0 and done != total or done == stop_at_step != total:
                save_training_state(ckpt, model, optimizer, named, done, total, cfg)
            if done == stop_at_step != total:
                progress(f"stopped at step {done}; continue with resume (--resume)")
                return {"step": done, "loss": loss_value, "metrics": metrics, "seconds": time.time() - t0,
                        "model": model, "stopped": True}
        if val:
            metrics = _validate(model, processor, val, cfg, total, progress, log)
        save_training_state(ckpt, model, optimizer, named, total, total, cfg, {"metrics": metrics})
    finally:
        log.close()
    # The finished model, Hugging Face layout.
    # Written beside the training files, each renamed into `out` only once all are complete.
    tmp = staging_folder(out / "model")
    try:
        save_checkpoint(model, tmp, max_shard_bytes=2 << 30)
        processor.save_pretrained(tmp)
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "train_metrics.json").write_text(json.dumps({"step": total, "final_loss": loss_value, "metrics": metrics,
                                                       "config": cfg.to_json()}, indent=2) + "\n")
    seconds = time.time() - t0
    progress(f"wrote {out} ({total - start} steps in {seconds / 60:.1f} min)")
    return {"step": total, "loss": loss_value, "metrics": metrics, "seconds": seconds, "model": model}


def _validate(model, processor, val, cfg: TrainConfig, step: int, progress, log) -> dict:
    t = time.time()
    metrics = evaluate(model, processor, spread_subset(val, cfg.eval_examples), batch_size=max(cfg.batch_size, 32),
                       max_new_tokens=cfg.max_new_tokens)
    progress(f"validation at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
             + f" ({time.time() - t:.0f} s)")
    log.write(json.dumps({"step": step, "validation": metrics}) + "\n")
    log.flush()
    return metrics
