"""Load a checkpoint folder, a quantized folder or a preset into `pgexport.models.PaliGemma`.

    >>> model = load_model("paligemma-tiny")                  # preset: random weights
    >>> processor = load_processor("paligemma-tiny")
    >>> model = load_model("path/to/paligemma-3b-pt-224", dtype="bfloat16", device="cuda")  # doctest: +SKIP

A bare preset name always means the preset, whatever folders the current directory holds; write
`./paligemma-tiny` to load a folder of that name. Callers resolve "no model given" to
`pgexport.bundled.default_model()` before calling in.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pgexport.eager.quanto import is_quantized_folder, load_quantized
from pgexport.errors import PgExportError
from pgexport.files import move_into_place, staging_folder
from pgexport.models.checkpoint import load_checkpoint, save_checkpoint
from pgexport.models.config import PRESETS, PaliGemmaConfig
from pgexport.models.paligemma import PaliGemma
from pgexport.processing.processor import PaliGemmaProcessor

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """"float32" / "bf16" / "half" ... -> the torch dtype; a one-line error for anything else."""
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise PgExportError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(device: str) -> torch.device:
    """"cpu" / "cuda" / "cuda:N" -> a torch device that exists on this machine."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PgExportError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:  # torch's message lists two dozen device types over several lines
        raise PgExportError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None


def is_folder_spec(spec: str | Path | None) -> bool:
    """True if `spec` names a checkpoint/export folder rather than a preset."""
    if spec is None:
        return False
    text = str(spec)
    return Path(text).is_dir() and not (text in PRESETS and "/" not in text and "\\" not in text)


def not_found(spec: str) -> PgExportError:
    """The error for a model spec that is neither a folder nor a preset."""
    if Path(spec).exists():
        return PgExportError(f"{spec} is a file, not a checkpoint folder; pass the folder that holds config.json")
    if any(sep in spec for sep in ("/", "\\")) or spec.startswith("."):
        return PgExportError(f"checkpoint folder {spec} not found; check the path or pass a preset name")
    return PgExportError(f"{spec!r} is neither a checkpoint folder nor a preset; presets: {', '.join(PRESETS)}")


def check_spec(spec: str) -> None:
    """Raise the one-line `not_found` error unless `spec` is a folder or a preset (nothing is loaded)."""
    if not is_folder_spec(spec) and spec not in PRESETS:
        raise not_found(spec)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> PaliGemma:
    """A checkpoint folder, an optimum-quanto folder or a preset (random weights) -> eval-mode model."""
    dt, dev = torch_dtype(dtype), resolve_device(device)
    if is_folder_spec(spec):
        if is_quantized_folder(spec):  # written by `pgexport quantize` (optimum-quanto int8 / int4)
            if dt != torch.float32:
                raise PgExportError(f"{spec} is quantized (optimum-quanto); it runs with --dtype float32 only")
            return load_quantized(spec, device=dev)
        return load_checkpoint(spec, dtype=dt, device=dev)
    if spec in PRESETS:
        return PaliGemma.random(PaliGemmaConfig.from_preset(spec), seed=seed, dtype=dt).to(dev)
    raise not_found(spec)


def load_processor(spec: str) -> PaliGemmaProcessor:
    """The processor of a checkpoint folder, or the stand-in tokenizer's for a preset."""
    if is_folder_spec(spec):
        return PaliGemmaProcessor.from_pretrained(spec)
    check_spec(spec)
    cfg = PaliGemmaConfig.from_preset(spec)
    return PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size, cfg.num_image_tokens)


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, dtype: str = "float32", progress=print) -> Path:
    """Write a random-weight checkpoint of a preset in the Hugging Face layout; returns the folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PgExportError(f"{out} exists and is not empty; choose another --out or remove it")
    if preset not in PRESETS:
        raise not_found(preset)
    cfg = PaliGemmaConfig.from_preset(preset)
    tmp = staging_folder(out)
    try:
        progress(f"building {preset} with random weights (seed {seed}, {dtype})")
        model = PaliGemma.random(cfg, seed=seed, dtype=torch_dtype(dtype))
        progress("writing weights")
        save_checkpoint(model, tmp, max_shard_bytes=2 << 30)
        PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size, cfg.num_image_tokens).save_pretrained(tmp)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
