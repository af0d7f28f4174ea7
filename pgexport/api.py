"""Public Python API of the eager PyTorch path (needs the `export` extra for torch).

    >>> import pgexport
    >>> model = pgexport.load_model("paligemma-tiny")          # preset: random weights
    >>> processor = pgexport.load_processor("paligemma-tiny")
    >>> inputs = processor(images=[pgexport.sample_image()], prompts=["caption en"])
    >>> model(**inputs).shape[:2] == inputs["input_ids"].shape
    True
    >>> texts = pgexport.generate(model, processor, [pgexport.sample_image()], ["caption en"], max_new_tokens=5)

Every function takes a checkpoint folder, a preset name, or None for the built-in demo model,
and resolves it here, so the layers below (`pgexport.exporters`, `pgexport.eager`) only ever
see a folder or a model object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgexport.bundled import SAMPLE_IMAGE, default_model, sample_image
from pgexport.eager import loading
from pgexport.eager.generate import generate_stream, generate_text
from pgexport.eager.quanto import is_quantized_folder, quantize_checkpoint
from pgexport.errors import PgExportError
from pgexport.exporters.pipeline import export_folder
from pgexport.exporters.transformersjs import export_transformersjs

__all__ = ["SAMPLE_IMAGE", "sample_image", "default_model", "load_model", "load_processor", "init_checkpoint",
           "generate", "generate_stream", "export", "quantize"]

LAYOUTS = ("pgexport", "transformers.js")
init_checkpoint = loading.init_checkpoint
# Text for each (image, prompt) pair with the eager model: generate(model, processor, images, prompts, max_new_tokens=32)
generate = generate_text


def load_model(path_or_preset: str | Path | None = None, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """Load a checkpoint folder (Hugging Face layout), an optimum-quanto folder, or build a preset
    with random weights; None loads the built-in demo model. Returns a `PaliGemma` in eval mode.

    >>> model = load_model("path/to/paligemma-3b-pt-224", dtype="bfloat16", device="cuda")  # doctest: +SKIP
    """
    return loading.load_model(str(path_or_preset or default_model()), dtype=dtype, device=device, seed=seed)


def load_processor(path_or_preset: str | Path | None = None):
    """The processor (tokenizer + image preprocessing + prompt format) of a folder or preset.

    >>> processor = load_processor("paligemma-tiny")
    >>> batch = processor(images=[sample_image()], prompts=["caption en"])
    """
    return loading.load_processor(str(path_or_preset or default_model()))


def resolve(spec: str | os.PathLike | None) -> tuple[Any, Any, dict]:
    """A folder / preset / None -> (checkpoint folder or in-memory preset model, processor, source).

    Checkpoint folders stay paths (the exporter streams their weights); presets are built here.
    """
    spec = str(spec or default_model())
    if is_quantized_folder(spec):
        raise PgExportError(f"{spec} holds optimum-quanto weights, which cannot be traced to ONNX or re-quantized; "
                            "use the float checkpoint instead")
    processor = loading.load_processor(spec)  # also: a clear error for a bad spec
    if loading.is_folder_spec(spec):
        # the folder's name only: the manifest travels with the export, the exporter's paths need not
        return Path(spec), processor, {"model": Path(spec).resolve().name, "kind": "checkpoint"}
    return loading.load_model(spec), processor, {"model": spec, "kind": "preset"}


def export(path_or_preset: str | os.PathLike | None, out_dir: str | os.PathLike, quant: str = "fp32",
           layout: str = "pgexport", **options) -> dict:
    """`pgexport onnx`: export a folder, preset or the built-in model to an ONNX folder.

    `layout`: "pgexport" (the three graphs + manifest; `options` are
    `pgexport.exporters.pipeline.export_folder`'s: opset, validate, overwrite, quant_options,
    threads, progress, ...) or "transformers.js" (the folder `@huggingface/transformers` loads;
    `options` are `pgexport.exporters.transformersjs.export_transformersjs`'s).

    >>> export("paligemma-tiny", "exports/tiny", quant="int8")  # doctest: +SKIP
    >>> export(None, "exports/demo-web", quant="int4", layout="transformers.js")  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise PgExportError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    model, processor, source = resolve(path_or_preset)
    if layout == "transformers.js":
        return export_transformersjs(model, out_dir, processor, quants=(quant,), source=source, **options)
    return export_folder(model, out_dir, quant=quant, processor=processor, source=source, **options)


def quantize(path_or_preset: str | os.PathLike | None, out_dir: str | os.PathLike, quant: str = "int8", **options) -> Path:
    """`pgexport quantize`: optimum-quanto int8 / int4 weights for the eager model.

    >>> quantize("paligemma-tiny", "tiny-int8", quant="int8")  # doctest: +SKIP
    """
    model, processor, _ = resolve(path_or_preset)
    return quantize_checkpoint(model, out_dir, quant=quant, processor=processor, **options)
