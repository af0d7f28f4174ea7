"""Public Python API of the eager PyTorch path (needs the `export` extra for torch).

    >>> import pgexport
    >>> model = pgexport.load_model("paligemma-tiny")          # preset: random weights
    >>> processor = pgexport.load_processor("paligemma-tiny")
    >>> inputs = processor(images=[pgexport.sample_image()], prompts=["caption en"])
    >>> model(**inputs).shape[:2] == inputs["input_ids"].shape
    True
    >>> texts = pgexport.generate(model, processor, [pgexport.sample_image()], ["caption en"], max_new_tokens=5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import PgExportError
from .generation import Sampling

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"


def sample_image():
    """A small picture of three shapes shipped with the package (PIL image)."""
    from PIL import Image

    return Image.open(SAMPLE_IMAGE).convert("RGB")


def default_model() -> str:
    """The built-in model used when no `--model` is given: the demo model shipped in the package
    (`pgexport/assets/demo/`, trained from scratch on the synthetic shapes data by
    `examples/train_demo.py`; see `pgexport.demo`)."""
    from .demo import DEMO_DIR

    # A source checkout where the demo has not been trained yet falls back to the random preset.
    return str(DEMO_DIR) if (DEMO_DIR / "config.json").is_file() else "paligemma-tiny"


def torch_dtype(name: str):
    import torch

    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise PgExportError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _resolve_device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PgExportError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:  # torch's message lists two dozen device types over several lines
        raise PgExportError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None


def _not_found(spec: str) -> PgExportError:
    from .models.config import PRESETS

    if Path(spec).exists():
        return PgExportError(f"{spec} is a file, not a checkpoint folder; pass the folder that holds config.json")
    if any(sep in spec for sep in ("/", "\\")) or spec.startswith("."):
        return PgExportError(f"checkpoint folder {spec} not found; check the path or pass a preset name")
    return PgExportError(f"{spec!r} is neither a checkpoint folder nor a preset; presets: {', '.join(PRESETS)}")


def is_folder_spec(spec: str | Path | None) -> bool:
    """True if `spec` names a checkpoint/export folder rather than a preset.

    A bare preset name (`paligemma-tiny`) always means the preset, whatever folders the current
    directory holds; write `./paligemma-tiny` to load a folder of that name.
    """
    if spec is None:
        return False
    from .models.config import PRESETS

    text = str(spec)
    return Path(text).is_dir() and not (text in PRESETS and "/" not in text and "\\" not in text)


def load_model(path_or_preset: str | Path | None = None, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """Load a checkpoint folder (Hugging Face layout) or build a preset with random weights.

    Returns a `pgexport.models.PaliGemma` in eval mode.

    >>> model = load_model("path/to/paligemma-3b-pt-224", dtype="bfloat16", device="cuda")  # doctest: +SKIP
    """
    from .models.checkpoint import load_checkpoint
    from .models.config import PRESETS, PaliGemmaConfig
    from .models.paligemma import PaliGemma

    spec = str(path_or_preset or default_model())
    dt, dev = torch_dtype(dtype), _resolve_device(device)
    if is_folder_spec(spec):
        from .quanto_backend import is_quantized_folder, load_quantized

        if is_quantized_folder(spec):  # written by `pgexport quantize` (optimum-quanto int8 / int4)
            if dt != torch_dtype("float32"):
                raise PgExportError(f"{spec} is quantized (optimum-quanto); it runs with --dtype float32 only")
            return load_quantized(spec, device=dev)
        return load_checkpoint(spec, dtype=dt, device=dev)
    if spec in PRESETS:
        return PaliGemma.random(PaliGemmaConfig.from_preset(spec), seed=seed, dtype=dt).to(dev)
    raise _not_found(spec)


def load_processor(path_or_preset: str | Path | None = None):
    """The processor (tokenizer + image preprocessing + prompt format) of a folder or preset.

    >>> processor = load_processor("paligemma-tiny")
    >>> batch = processor(images=[sample_image()], prompts=["caption en"])
    """
    from .processor import PaliGemmaProcessor

    spec = str(path_or_preset or default_model())
    if is_folder_spec(spec):
        return PaliGemmaProcessor.from_pretrained(spec)
    from .models.config import PRESETS, PaliGemmaConfig
    from .tokenizer import build_paligemma_tokenizer

    if spec not in PRESETS:
        raise _not_found(spec)
    cfg = PaliGemmaConfig.from_preset(spec)
    tokenizer = build_paligemma_tokenizer(cfg.image_token_id - 1152)
    return PaliGemmaProcessor(tokenizer, image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens)


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, dtype: str = "float32", progress=print) -> Path:
    """Write a random-weight checkpoint of a preset in the Hugging Face layout; returns the folder.

    Written to a temporary sibling folder and renamed at the end, so an interrupted run leaves
    nothing that looks finished.

    >>> init_checkpoint("paligemma2-tiny", "tiny2", seed=1)  # doctest: +SKIP
    """
    import shutil

    from .image import write_preprocessor_config
    from .models.checkpoint import save_checkpoint
    from .models.config import PaliGemmaConfig
    from .models.paligemma import PaliGemma
    from .tokenizer import build_paligemma_tokenizer, save_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PgExportError(f"{out} exists and is not empty; choose another --out or remove it")
    cfg = PaliGemmaConfig.from_preset(preset)
    from .staging import move_into_place, staging_folder

    tmp = staging_folder(out)
    try:
        progress(f"building {preset} with random weights (seed {seed}, {dtype})")
        model = PaliGemma.random(cfg, seed=seed, dtype=torch_dtype(dtype))
        progress("writing weights")
        save_checkpoint(model, tmp, max_shard_bytes=2 << 30)
        save_tokenizer(build_paligemma_tokenizer(cfg.image_token_id - 1152), tmp)
        write_preprocessor_config(tmp, cfg.vision.image_size, cfg.num_image_tokens)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def generate(model, processor, images: list[Any], prompts: list[str], max_new_tokens: int = 32,
             sampling: Sampling | None = None) -> list[str]:
    """Generate text for each (image, prompt) pair with the eager model; returns decoded strings.

    >>> generate(model, processor, [img], ["detect circle"], max_new_tokens=16)  # doctest: +SKIP
    ['<loc0123><loc0045><loc0456><loc0789> circle']
    """
    from .models.generate import generate as generate_ids

    context = model.cfg.text.max_position_embeddings
    if max_new_tokens >= context:
        raise PgExportError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} tokens "
                            "(prompt included); ask for fewer new tokens")
    batch = processor(images=images, prompts=prompts, max_length=context - max_new_tokens)
    ids = generate_ids(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens, sampling)
    return processor.batch_decode(ids, skip_special_tokens=True)
