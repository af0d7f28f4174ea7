"""Export a model to a self-contained ONNX folder: graphs + manifest + tokenizer + validation.

    >>> from pgexport.exporters.pipeline import export_folder
    >>> result = export_folder("path/to/paligemma-3b-pt-224", "exports/pg-224")  # doctest: +SKIP
    >>> result["report"]["greedy_agreement"]  # doctest: +SKIP
    1.0

The folder (the public contract, see README "ONNX export"):

    pgexport.json             manifest: graph files, KV geometry, image settings, special ids, dtype
    vision_encoder.onnx       + vision_encoder.onnx.data
    prefill.onnx, decode.onnx + decoder.onnx.data (one file both graphs point into)
    tokenizer.json            (or tokenizer.model) + tokenizer_config.json, special_tokens_map.json
    preprocessor_config.json  image size, mean/std, resampling (Hugging Face format)
    config.json               the model's Hugging Face config (provenance)
    export_report.json        ONNX Runtime vs eager PyTorch on a sample (unless validate=False)

Everything is written into a hidden temporary folder beside `out_dir` and renamed into place at
the end, so an interrupted export leaves nothing that looks finished. A validation that fails
its tolerances keeps the folder (with its report) and raises `ExportValidationError`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pgexport.errors import PgExportError
from pgexport.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, write_manifest
from pgexport.staging import move_into_place, staging_folder

QUANTS = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
# Weight quantization (exporters/quantize.py): float32 graphs, int8 / int4 weights.
INT_QUANTS = ("int8", "int4")
REPORT_FILE = "export_report.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
NEWLINE = "\n"


class ExportValidationError(PgExportError):
    """The export was written but ONNX Runtime disagrees with eager PyTorch beyond the tolerances."""


def _export_onnx():
    from . import onnx_export

    return onnx_export.export_onnx, onnx_export


def supports_dtype() -> bool:
    """Whether `export_onnx` takes `dtype=` (fp16 export), checked at run time."""
    export_onnx, _ = _export_onnx()
    return "dtype" in inspect.signature(export_onnx).parameters


def normalize_quant(quant: str) -> str:
    """"fp32"/"fp16" (or the dtype names) -> the dtype name, "int8"/"int4" -> "float32" (the graphs'
    dtype; the weights are quantized after export); fails early when unavailable."""
    if str(quant).lower() in INT_QUANTS:
        return "float32"
    dtype = QUANTS.get(str(quant).lower())
    if dtype is None:
        raise PgExportError(f"unknown --quant {quant!r}; choose fp32, fp16, int8 or int4")
    if dtype != "float32" and not supports_dtype():
        raise PgExportError(f"--quant {quant} is not available yet: this build's export_onnx has no dtype option; "
                            "use --quant fp32")
    return dtype


def export_folder(
    model: Any = None,
    out_dir: str | os.PathLike = "exports/model",
    quant: str = "fp32",
    opset: int | None = None,
    validate: bool = True,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    processor: Any = None,
    threads: int | None = None,
    max_new_tokens: int = 16,
    quant_options: dict | None = None,
    ort_fusions: bool | None = None,
) -> dict:
    """Export a model to `out_dir` (see the module docstring); returns what was done.

    `model`: a checkpoint folder (streamed by export_onnx when it can, else loaded), a preset
    name, a `pgexport.models.PaliGemma`, or None for the built-in default model. The eager float32
    model (`pgexport.load_model`) is the validation reference. For a model object,
    `processor` gives the tokenizer and image settings (default: the stand-in tokenizer of the
    presets, built for the model's vocabulary layout).

    `quant`: "fp32", "fp16", or "int8" / "int4" (float32 graphs whose weights are then quantized
    by `exporters/quantize.py`; `quant_options` are `QuantOptions.create`'s keyword arguments:
    block_size, symmetric, accuracy_level, int8_format, head_bits, target). The validation of a
    quantized export gates on accuracy (top-1 agreement, KL divergence, cosine), not on 1e-4.
    `ort_fusions`: passed to export_onnx when it has that option (None: its default); quantized
    exports always export without fusions.

    Returns {"out_dir", "files" {name: bytes}, "total_bytes", "manifest" (dict), "report"
    (dict or None), "export" (what export_onnx returned), "quantization" (None, or what
    quantize_folder returned, with bytes_before / bytes_after)}.
    """
    say = progress or (lambda _m: None)
    dtype = normalize_quant(quant)
    qoptions = None
    if str(quant).lower() in INT_QUANTS:
        from .quantize import QuantOptions

        qoptions = QuantOptions.create(str(quant).lower(), **(quant_options or {}))  # bad options fail here, early
    elif quant_options:
        raise PgExportError(f"quantization options apply to --quant int8 / int4, not {quant}")
    export_onnx, onnx_export = _export_onnx()
    opset = opset or onnx_export.DEFAULT_OPSET
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PgExportError(f"{out_dir} is a file; choose another --out folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PgExportError(f"{out_dir} exists and is not empty; choose another --out or remove it")

    spec, model, processor, source = _load(model, processor, say)

    staging_root = staging_folder(out_dir)
    folder = staging_root / out_dir.name
    try:
        kwargs = {"opset": opset, "progress": say}
        if dtype != "float32":
            kwargs["dtype"] = dtype
        if qoptions is not None:
            # A fused com.microsoft Attention holds the packed QKV weight as a float input the
            # quantizer cannot rewrite: quantized exports keep the plain MatMuls.
            ort_fusions = False
        if ort_fusions is not None and "ort_fusions" in inspect.signature(export_onnx).parameters:
            kwargs["ort_fusions"] = ort_fusions
        # A checkpoint folder goes to export_onnx as a path when it takes one (weights streamed
        # from the safetensors files, no model in memory); otherwise the model is loaded here.
        from pgexport.api import is_folder_spec

        if model is None and not (spec is not None and is_folder_spec(spec) and _accepts_folder(export_onnx)):
            say(f"loading {spec}")
            model = _load_eager(spec)
        info = export_onnx(model if model is not None else spec, folder, **kwargs)
        quantization: Any = "none"
        qinfo = None
        if qoptions is not None:
            from .quantize import quantize_folder

            qinfo = quantize_folder(folder, qoptions, progress=say)
            quantization = {k: v for k, v in qinfo.items() if k not in ("bytes_before", "bytes_after")}
            quantization["size_ratio"] = round(qinfo["bytes_after"] / qinfo["bytes_before"], 4)
        cfg = _exported_config(folder, model)
        graph_files = {"vision_encoder": onnx_export.VISION_FILE, "prefill": onnx_export.PREFILL_FILE,
                       "decode": onnx_export.DECODE_FILE}
        for key, name in graph_files.items():
            if not (folder / name).is_file():
                raise RuntimeError(f"export_onnx wrote no {name} ({key}) into {folder}")

        say("writing the tokenizer and preprocessor config")
        tokenizer_file = _write_tokenizer(processor, spec, folder)
        _write_preprocessor_config(processor, folder)

        manifest = Manifest(
            graphs=graph_files,
            num_layers=cfg.text.num_hidden_layers,
            num_kv_heads=cfg.text.num_key_value_heads,
            head_dim=cfg.text.head_dim,
            hidden_size=cfg.text.hidden_size,
            vocab_size=cfg.text.vocab_size,
            num_image_tokens=cfg.num_image_tokens,
            image_size=cfg.vision.image_size,
            image_mean=[float(x) for x in processor.mean],
            image_std=[float(x) for x in processor.std],
            image_token_id=cfg.image_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            dtype=dtype,
            quantization=quantization,
            tokenizer=tokenizer_file,
            opset=int(info.get("opset", opset)) if isinstance(info, dict) else opset,
            format_version=FORMAT_VERSION,
            image_resample=int(processor.resample),
            newline_token_id=_newline_id(processor),
            max_position_embeddings=cfg.text.max_position_embeddings,
            model_type="paligemma2" if cfg.is_paligemma2 else "paligemma",
            preprocessor_config=PREPROCESSOR_FILE,
            source=source,
        )
        if manifest.image_size != processor.image_size or manifest.num_image_tokens != processor.num_image_tokens:
            raise PgExportError(f"the processor ({processor.image_size} px, {processor.num_image_tokens} image tokens) "
                                f"does not match the model ({manifest.image_size} px, {manifest.num_image_tokens} "
                                "tokens); fix preprocessor_config.json of the checkpoint")
        manifest.files = _file_sizes(folder)
        write_manifest(folder, manifest)

        report = None
        if validate:
            from .validate import validate_export

            say("validating: ONNX Runtime vs eager PyTorch on the bundled sample")
            reference = model if model is not None else (lambda: _load_eager(spec))
            report = validate_export(folder, reference, processor, max_new_tokens=max_new_tokens, threads=threads)
            say(f"validation: max logit difference {report['logits_max_abs_diff']:.2e}, greedy agreement "
                f"{report['greedy_agreement']:.0%} over {report['greedy_tokens']} tokens"
                + (f", top-1 agreement {report['quality']['top1_agreement']:.1%}, mean KL "
                   f"{report['quality']['mean_kl']:.2e}" if "quality" in report else "")
                + ("" if report["passed"] else " (FAILED)"))
        manifest.files = _file_sizes(folder)
        write_manifest(folder, manifest)
        move_into_place(folder, out_dir)
    except BaseException:
        shutil.rmtree(staging_root, ignore_errors=True)
        raise
    shutil.rmtree(staging_root, ignore_errors=True)

    files = _file_sizes(out_dir)
    total = sum(files.values())
    say(f"wrote {out_dir}: {total / 2**20:.1f} MiB")
    result = {"out_dir": str(out_dir), "files": files, "total_bytes": total, "manifest": manifest.to_dict(),
              "report": report, "export": info, "quantization": qinfo}
    if report is not None and not report["passed"]:
        raise ExportValidationError(
            f"validation failed: {'; '.join(report['failures'])}; the export was kept, see {out_dir / REPORT_FILE}")
    return result


# ---------------------------------------------------------------------------- pieces
def _load(model, processor, say):
    """(spec, model or None, processor, source description) from a spec, a model or None.

    A checkpoint folder or preset is not loaded here (the model is None); see `_load_eager`.
    """
    from pgexport import api

    if model is None or isinstance(model, (str, os.PathLike)):
        spec = str(model) if model is not None else api.default_model()
        from pgexport.quanto_backend import is_quantized_folder

        if is_quantized_folder(spec):
            raise PgExportError(f"{spec} holds optimum-quanto weights, which cannot be traced to ONNX; export the float "
                                "checkpoint with --quant int8 or --quant int4 instead")
        processor = processor or api.load_processor(spec)  # also: a clear error for a bad spec
        is_dir = api.is_folder_spec(spec)
        # the folder's name only: the manifest travels with the export, the exporter's paths need not
        source = {"model": Path(spec).resolve().name if is_dir else spec, "kind": "checkpoint" if is_dir else "preset"}
        return spec, None, processor, _with_version(source)
    from pgexport.models import PaliGemma

    if not isinstance(model, PaliGemma):
        raise PgExportError(f"cannot export a {type(model).__name__}; pass a checkpoint folder, a preset name "
                            "or a pgexport.models.PaliGemma")
    if processor is None:
        from pgexport.processor import PaliGemmaProcessor
        from pgexport.tokenizer import build_paligemma_tokenizer

        cfg = model.cfg
        base = cfg.image_token_id - 1024 - 128  # loc, seg, then <image>
        processor = PaliGemmaProcessor(build_paligemma_tokenizer(base), image_size=cfg.vision.image_size,
                                       num_image_tokens=cfg.num_image_tokens)
    return None, model.eval(), processor, _with_version({"model": type(model).__name__, "kind": "object"})


def _load_eager(spec: str):
    """The eager float32 model of a checkpoint folder or preset (the validation reference)."""
    from pgexport import api

    return api.load_model(spec, dtype="float32").eval()


def _accepts_folder(export_onnx) -> bool:
    """Whether export_onnx takes a checkpoint folder for `model` (checked on its signature)."""
    annotation = str(inspect.signature(export_onnx).parameters["model"].annotation)
    return "PathLike" in annotation or "str" in annotation


def _exported_config(folder: Path, model):
    """The config of what was exported: export_onnx's config.json, else the model's."""
    from pgexport.models.config import PaliGemmaConfig

    if (folder / "config.json").is_file():
        return PaliGemmaConfig.from_json_file(folder / "config.json")
    cfg = model.cfg
    cfg.to_json_file(folder / "config.json")
    return cfg


def _with_version(source: dict) -> dict:
    from pgexport import __version__

    return {**source, "pgexport_version": __version__}


def _write_tokenizer(processor, spec: str | None, folder: Path) -> str:
    """The checkpoint's own tokenizer files when there are any (byte for byte), else the processor's."""
    from pgexport.tokenizer import SentencePieceTokenizer, save_tokenizer

    from pgexport.api import is_folder_spec

    src = Path(spec) if spec is not None and is_folder_spec(spec) else None
    if src is not None and ((src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()):
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
        return "tokenizer.json" if (folder / "tokenizer.json").is_file() else "tokenizer.model"
    save_tokenizer(processor.tokenizer, folder)
    return "tokenizer.model" if isinstance(processor.tokenizer, SentencePieceTokenizer) else "tokenizer.json"


def _write_preprocessor_config(processor, folder: Path) -> None:
    """`preprocessor_config.json` in the published checkpoints' format, with the processor's values."""
    config = {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "image_seq_length": int(processor.num_image_tokens),
        "size": {"height": int(processor.image_size), "width": int(processor.image_size)},
        "resample": int(processor.resample),
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in processor.mean],
        "image_std": [float(x) for x in processor.std],
        "do_convert_rgb": True,
    }
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _newline_id(processor) -> int | None:
    ids = processor.tokenizer.encode(NEWLINE, add_special_tokens=False).ids
    return int(ids[0]) if len(ids) == 1 else None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")}


