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

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pgexport import __version__
from pgexport.errors import PgExportError
from pgexport.exporters.onnx_export import DECODE_FILE, DECODER_FILE, DEFAULT_OPSET, PREFILL_FILE, VISION_FILE, export_onnx
from pgexport.exporters.quantize import QuantOptions, quantize_folder
from pgexport.exporters.validate import REPORT_FILE, validate_export
from pgexport.files import move_into_place, staging_folder
from pgexport.models.checkpoint import load_checkpoint
from pgexport.models.config import PaliGemmaConfig
from pgexport.models.paligemma import PaliGemma
from pgexport.processing.image import PREPROCESSOR_FILE, write_preprocessor_config
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.processing.tokenizer import SentencePieceTokenizer, save_tokenizer
from pgexport.runtime.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, write_manifest

QUANTS = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
# Weight quantization (exporters/quantize.py): float32 graphs, int8 / int4 weights.
INT_QUANTS = ("int8", "int4")
NEWLINE = "\n"


class ExportValidationError(PgExportError):
    """The export was written but ONNX Runtime disagrees with eager PyTorch beyond the tolerances."""


def normalize_quant(quant: str) -> str:
    """"fp32"/"fp16" (or the dtype names) -> the dtype name, "int8"/"int4" -> "float32" (the graphs'
    dtype; the weights are quantized after export)."""
    if str(quant).lower() in INT_QUANTS:
        return "float32"
    dtype = QUANTS.get(str(quant).lower())
    if dtype is None:
        raise PgExportError(f"unknown --quant {quant!r}; choose fp32, fp16, int8 or int4")
    return dtype


def export_folder(
    model: PaliGemma | str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: str = "fp32",
    opset: int | None = None,
    validate: bool = True,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    processor: PaliGemmaProcessor | None = None,
    threads: int | None = None,
    max_new_tokens: int = 16,
    quant_options: dict | None = None,
    ort_fusions: bool = False,
    source: dict | None = None,
) -> dict:
    """Export a model to `out_dir` (see the module docstring); returns what was done.

    `model`: a checkpoint folder (its weights are streamed from the safetensors files, never
    loaded whole) or a `pgexport.models.PaliGemma`. Presets and the built-in default are
    resolved by the caller (`pgexport.api.export`). `processor` gives the tokenizer and image
    settings (default: the folder's own, or for a model object the presets' stand-in tokenizer).
    The eager float32 model is the validation reference.

    `quant`: "fp32", "fp16", or "int8" / "int4" (float32 graphs whose weights are then quantized
    by `exporters/quantize.py`; `quant_options` are `QuantOptions.create`'s keyword arguments:
    block_size, symmetric, accuracy_level, int8_format, head_bits, target). The validation of a
    quantized export gates on accuracy (top-1 agreement, KL divergence, cosine), not on 1e-4.
    `ort_fusions`: fuse the fp32 vision encoder for ONNX Runtime (never for quantized exports).
    `source`: what the manifest records as the model's origin (default: from `model`).

    Returns {"out_dir", "files" {name: bytes}, "total_bytes", "manifest" (dict), "report"
    (dict or None), "export" (what export_onnx returned), "quantization" (None, or what
    quantize_folder returned, with bytes_before / bytes_after)}.

    >>> export_folder("path/to/paligemma-3b-pt-224", "exports/pg-224", quant="int8")  # doctest: +SKIP
    """
    say = progress or (lambda _m: None)
    dtype = normalize_quant(quant)
    qoptions = None
    if str(quant).lower() in INT_QUANTS:
        qoptions = QuantOptions.create(str(quant).lower(), **(quant_options or {}))  # bad options fail here, early
        # A fused com.microsoft Attention holds the packed QKV weight as a float input the
        # quantizer cannot rewrite: quantized exports keep the plain MatMuls.
        ort_fusions = False
    elif quant_options:
        raise PgExportError(f"quantization options apply to --quant int8 / int4, not {quant}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PgExportError(f"{out_dir} is a file; choose another --out folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PgExportError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    folder_in, processor, source = _inputs(model, processor, source)

    staging_root = staging_folder(out_dir)
    folder = staging_root / out_dir.name
    try:
        info = export_onnx(model, folder, opset=opset or DEFAULT_OPSET, progress=say, dtype=dtype,
                           ort_fusions=ort_fusions)
        qinfo = quantize_folder(folder, qoptions, progress=say) if qoptions is not None else None
        cfg = PaliGemmaConfig.from_json_file(folder / "config.json")  # written by export_onnx

        say("writing the tokenizer and preprocessor config")
        tokenizer_file = _write_tokenizer(processor, folder_in, folder)
        write_preprocessor_config(folder, processor.image_size, processor.num_image_tokens, processor.mean,
                                  processor.std, processor.resample)
        manifest = _manifest(cfg, processor, dtype, qinfo, tokenizer_file, info["opset"], source)
        manifest.files = _file_sizes(folder)
        write_manifest(folder, manifest)

        report = None
        if validate:
            say("validating: ONNX Runtime vs eager PyTorch on the bundled sample")
            # A folder's reference is loaded only now, after export, and released before ONNX
            # Runtime loads the graphs (one model in memory at a time).
            reference = model if folder_in is None else (lambda: load_checkpoint(folder_in))
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
def _inputs(model, processor, source) -> tuple[Path | None, PaliGemmaProcessor, dict]:
    """(checkpoint folder or None, processor, source description) of what is exported."""
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise PgExportError(f"{folder} is not a checkpoint folder (no config.json); pass a Hugging Face "
                                "PaliGemma folder, or a preset through pgexport.api.export")
        processor = processor or PaliGemmaProcessor.from_pretrained(folder)
        source = source or {"model": folder.resolve().name, "kind": "checkpoint"}
        return folder, processor, {**source, "pgexport_version": __version__}
    if not isinstance(model, PaliGemma):
        raise PgExportError(f"cannot export a {type(model).__name__}; pass a checkpoint folder "
                            "or a pgexport.models.PaliGemma")
    model.eval()
    cfg = model.cfg
    processor = processor or PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size, cfg.num_image_tokens)
    source = source or {"model": type(model).__name__, "kind": "object"}
    return None, processor, {**source, "pgexport_version": __version__}


def _manifest(cfg: PaliGemmaConfig, processor, dtype: str, qinfo: dict | None, tokenizer_file: str, opset: int,
              source: dict) -> Manifest:
    quantization: Any = "none"
    if qinfo is not None:
        quantization = {k: v for k, v in qinfo.items() if k not in ("bytes_before", "bytes_after")}
        quantization["size_ratio"] = round(qinfo["bytes_after"] / qinfo["bytes_before"], 4)
    manifest = Manifest(
        graphs={"vision_encoder": VISION_FILE, "prefill": PREFILL_FILE, "decode": DECODE_FILE, "decoder": DECODER_FILE},
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
        opset=int(opset),
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
    return manifest


def _write_tokenizer(processor, src: Path | None, folder: Path) -> str:
    """The checkpoint's own tokenizer files when there are any (byte for byte), else the processor's."""
    if src is not None and ((src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()):
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
        return "tokenizer.json" if (folder / "tokenizer.json").is_file() else "tokenizer.model"
    save_tokenizer(processor.tokenizer, folder)
    return "tokenizer.model" if isinstance(processor.tokenizer, SentencePieceTokenizer) else "tokenizer.json"


def _newline_id(processor) -> int | None:
    ids = processor.tokenizer.encode(NEWLINE, add_special_tokens=False).ids
    return int(ids[0]) if len(ids) == 1 else None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")}


