"""int8 / int4 weights for the eager PyTorch model with optimum-quanto (`pgexport quantize`).

    >>> from pgexport.eager.quanto import quantize_checkpoint, load_quantized
    >>> quantize_checkpoint("paligemma-3b-pt-224", "pg-int4", quant="int4")  # doctest: +SKIP
    >>> model = load_quantized("pg-int4")  # doctest: +SKIP

A quantized folder holds:

    quantized_model.safetensors  the frozen quantized state dict (quanto's flattened tensors:
                                 `<linear>.weight._data` int8 / packed uint4, `._scale`,
                                 `._shift`; every other tensor as it was), no pickle
    quantization_map.json        `optimum.quanto.quantization_map(model)`: which module got
                                 which qtype
    config.json, tokenizer.json, preprocessor_config.json   copied from the source model

`load_quantized` builds the model on the meta device, turns the modules named in the map into
quanto modules (still on meta), then assigns the file's tensors (`load_state_dict(assign=True)`,
every key accounted for): the linear weights exist only in their quantized form, no float32 copy
of them is ever made (quanto's own `requantize` allocates empty float tensors for every
parameter first and loads non-strictly).

What is quantized: every `nn.Linear` (SigLIP attention + MLP, projector, Gemma attention +
MLP), weights only (activations stay float). What quanto cannot quantize, left in float: the
token embedding (quanto has no quantized `nn.Embedding`) and therefore the tied LM head, which
multiplies by that table (`F.linear(hidden, embed_tokens.weight)`, not an `nn.Linear`); the
SigLIP patch-embedding convolution and position embedding (excluded: 588 inputs divide by no
int4 group size), norms and biases. qint4 groups of 128 inputs, falling back by 32 to a divisor
of in_features, else one group per output channel (SigLIP's MLP width 4304 divides by none).
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pgexport.errors import PgExportError
from pgexport.files import move_into_place, staging_folder
from pgexport.models.checkpoint import load_checkpoint, read_config
from pgexport.models.paligemma import PaliGemma
from pgexport.processing.processor import PaliGemmaProcessor

WEIGHTS_FILE = "quantized_model.safetensors"
QMAP_FILE = "quantization_map.json"
QUANTS = {"int8": "qint8", "int4": "qint4"}
# Modules left in float even though quanto could quantize them (see the module docstring).
DEFAULT_EXCLUDE = ("vision_tower.embeddings.*",)
COPY_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json", "processor_config.json")


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as e:  # pragma: no cover - part of the export extra
        raise PgExportError(f"optimum-quanto is not installed ({e}); pip install 'pgexport[export]'") from None
    return quanto


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `quantize_checkpoint`."""
    p = Path(path)
    return (p / QMAP_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def quantize_model(model, quant: str = "int8", exclude: tuple[str, ...] = DEFAULT_EXCLUDE):
    """Quantize and freeze `model`'s linear weights in place (quanto); returns the model."""
    quanto = _quanto()
    if quant not in QUANTS:
        raise PgExportError(f"unknown quantization {quant!r}; choose int8 or int4")
    quanto.quantize(model, weights=getattr(quanto, QUANTS[quant]), exclude=list(exclude))
    quanto.freeze(model)
    _allow_inference_mode(model)
    return model.eval()


def _allow_inference_mode(model) -> None:
    """quanto's packed int4 weights fail under `torch.inference_mode` (which the eager generation
    uses): "Cannot set version_counter for inference tensor" when the weight is transposed for the
    matmul. Such modules run their forward with inference mode off (and no_grad): same numbers."""
    quanto = _quanto()

    def forward(self, x):
        with torch.inference_mode(False), torch.no_grad():
            return type(self).forward(self, x)

    for module in model.modules():
        if isinstance(module, quanto.QModuleMixin) and module.weight_qtype is not None and module.weight_qtype.bits < 8:
            module.forward = types.MethodType(forward, module)


def quantize_checkpoint(model: PaliGemma | str | os.PathLike, out_dir: str | os.PathLike, quant: str = "int8",
                        exclude: tuple[str, ...] = DEFAULT_EXCLUDE, overwrite: bool = False, processor=None,
                        progress=None) -> Path:
    """Quantize a checkpoint folder or a `PaliGemma` and write a quantized folder (see above).

    A folder's tokenizer and preprocessor files are copied as they are; for a model object they
    come from `processor` (default: the presets' stand-in tokenizer). Written to a staging folder
    and renamed into place at the end.

    >>> quantize_checkpoint("paligemma-3b-pt-224", "pg-int8", quant="int8")  # doctest: +SKIP
    """
    say = progress or (lambda _m: None)
    if quant not in QUANTS:
        raise PgExportError(f"unknown quantization {quant!r}; choose int8 or int4")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise PgExportError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    quanto = _quanto()
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        if is_quantized_folder(source):
            raise PgExportError(f"{source} is already quantized; quantize the float checkpoint instead")
        say(f"loading {source}")
        model = load_checkpoint(source, dtype=torch.float32)
    say(f"quantizing the linear layers to {quant} (optimum-quanto)")
    quantize_model(model, quant, exclude)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    qmap = quanto.quantization_map(model)

    tmp = staging_folder(out_dir)
    try:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt", "quantizer": "optimum-quanto",
                                                        "pgexport_quant": quant})
        (tmp / QMAP_FILE).write_text(json.dumps(qmap, indent=2, sort_keys=True) + "\n")
        model.cfg.to_json_file(tmp / "config.json")
        if source is not None:
            for name in COPY_FILES[1:]:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        if not any((tmp / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            cfg = model.cfg
            processor = processor or PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size,
                                                                 cfg.num_image_tokens)
            processor.save_pretrained(tmp)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out_dir}")
    return out_dir


def load_quantized(folder: str | os.PathLike, device: str = "cpu"):
    """A quantized folder -> `PaliGemma` with quanto modules, built without float linear weights."""
    _quanto()
    from optimum.quanto.quantize import _quantize_submodule

    folder = Path(folder)
    try:
        qmap = json.loads((folder / QMAP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PgExportError(f"{folder / QMAP_FILE} is missing or corrupt ({e}); re-run pgexport quantize") from None
    if not isinstance(qmap, dict):
        raise PgExportError(f"{folder / QMAP_FILE} is not a JSON object; re-run pgexport quantize")
    cfg = read_config(folder)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    modules = dict(model.named_modules())
    for name, qconfig in qmap.items():
        module = modules.get(name)
        if module is None or not isinstance(qconfig, dict) or qconfig.get("weights") not in ("qint8", "qint4", "qint2"):
            raise PgExportError(f"{folder / QMAP_FILE}: entry {name!r} {qconfig!r} does not match the model; "
                                "re-run pgexport quantize")
        activations = qconfig.get("activations", "none")
        _quantize_submodule(model, name, module, weights=qconfig["weights"],
                            activations=None if activations in (None, "none") else activations)
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise PgExportError(f"{folder / WEIGHTS_FILE} cannot be read as safetensors ({e}); re-run pgexport quantize") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise PgExportError(f"{folder / WEIGHTS_FILE} does not match {QMAP_FILE} and config.json "
                            f"({' '.join(first[1:2]).strip()[:300]}); re-run pgexport quantize") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise PgExportError(f"{folder / WEIGHTS_FILE} has no values for {', '.join(left[:3])}"
                            f"{' (+%d more)' % (len(left) - 3) if len(left) > 3 else ''}; re-run pgexport quantize")
    model = model.to(device).eval()
    _allow_inference_mode(model)
    return model


def describe_quantized(model) -> dict:
    """Counts of what is quantized in a quanto model (for messages and tests)."""
    quanto = _quanto()
    quantized = {n: m.weight_qtype.name for n, m in model.named_modules()
                 if isinstance(m, quanto.QModuleMixin) and m.weight_qtype is not None}
    float_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if not isinstance(p.data, quanto.QTensor))
    return {"quantized_modules": len(quantized), "qtypes": sorted(set(quantized.values())), "float_param_bytes": float_bytes}
