"""`pgexport.json`: the manifest of an export folder (no torch, no onnxruntime).

The manifest is what a program needs to run the three graphs without pgexport: which file is
which graph, the KV-cache geometry, the image preprocessing, the special token ids and how the
prompt is built. It is plain JSON, so any language can read it:

    >>> m = read_manifest("exports/paligemma-tiny")  # doctest: +SKIP
    >>> m.graphs["decode"], m.num_layers, m.num_kv_heads, m.head_dim  # doctest: +SKIP
    ('decode.onnx', 2, 1, 16)

`read_manifest` validates it (types, required fields, the graph files exist) and raises a
one-line `PgExportError` for a missing or corrupt manifest, an unsupported `format_version` or
a missing graph file. `write_manifest` writes atomically (temporary file + rename).

Format versions: a reader accepts its own `FORMAT_VERSION` and older ones it knows; a newer
version means the folder was written by a newer pgexport, and the error says to upgrade.
Fields may be added within a version (readers ignore unknown fields); removing or changing the
meaning of one bumps the version.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgexport.errors import PgExportError
from pgexport.files import write_text_atomic

MANIFEST_FILE = "pgexport.json"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
GRAPH_KEYS = ("vision_encoder", "prefill", "decode")
# Graphs a folder may add within format version 1 (readers that predate them ignore them):
# "decoder" is prefill and decode in one graph, so one session holds the decoder weights once.
OPTIONAL_GRAPH_KEYS = ("decoder",)
DTYPES = ("float32", "float16", "bfloat16")

# Names of the KV-cache inputs/outputs; `{i}` is the layer index, `{kv}` "key" or "value".
PAST_NAME = "past_key_values.{i}.{kv}"
PRESENT_NAME = "present.{i}.{kv}"


@dataclass
class Manifest:
    """Contents of `pgexport.json`. Field comments say what a runtime does with each."""

    graphs: dict[str, str]  # {"vision_encoder", "prefill", "decode"[, "decoder"]} -> ONNX file name in the folder
    num_layers: int  # decoder layers: decode takes/returns 2 * num_layers cache tensors
    num_kv_heads: int  # KV cache tensors are [batch, num_kv_heads, seq, head_dim]
    head_dim: int
    hidden_size: int  # image_features are [batch, num_image_tokens, hidden_size]
    vocab_size: int  # logits are [batch, vocab_size]
    num_image_tokens: int  # `<image>` tokens at the start of every prompt
    image_size: int  # pixel_values are [batch, 3, image_size, image_size]
    image_mean: list[float]  # pixel = (rgb / 255 - mean) / std, per channel
    image_std: list[float]
    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    dtype: str  # float dtype of the graphs' float inputs/outputs and weights: float32 | float16
    # "none", or for a weight-quantized export (pgexport onnx --quant int8|int4) an object:
    # bits, block_size, symmetric, accuracy_level, int8_format, head_bits, target, the ops used
    # ("linear", "embedding", "head", "conv", "nodes") and "unquantized" (float tensors left).
    # Informational for a runtime: the graphs carry everything they need.
    quantization: Any
    tokenizer: str  # tokenizer file in the folder (tokenizer.json, or tokenizer.model)
    opset: int  # ONNX default-domain opset of the graphs
    format_version: int = FORMAT_VERSION
    image_resample: int = 3  # PIL resampling filter of the resize (3 = bicubic)
    newline_token_id: int | None = None  # "\n", which ends every prompt
    max_position_embeddings: int | None = None  # context: prompt + new tokens must fit
    model_type: str = "paligemma"  # "paligemma" (Gemma decoder) or "paligemma2" (Gemma 2)
    preprocessor_config: str | None = "preprocessor_config.json"
    prompt_format: str = "<image>*num_image_tokens + <bos> + prompt + \\n"
    kv_cache: dict = field(default_factory=lambda: {
        "past": PAST_NAME, "present": PRESENT_NAME,
        "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
    })
    files: dict[str, int] = field(default_factory=dict)  # every file of the folder -> bytes (informational)
    source: dict = field(default_factory=dict)  # what was exported (model spec, pgexport version)

    # ------------------------------------------------------------------ derived names
    def past_names(self) -> list[str]:
        return [PAST_NAME.format(i=i, kv=kv) for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [PRESENT_NAME.format(i=i, kv=kv) for i in range(self.num_layers) for kv in ("key", "value")]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"format_version": d.pop("format_version"), **d}  # the version first, for readers


def describe_quantization(quantization: Any) -> str:
    """A short description of a manifest's `quantization` entry, e.g. "int4 (block 128, asymmetric,
    accuracy_level 4)"."""
    if not isinstance(quantization, dict):
        return str(quantization)
    bits = quantization.get("bits")
    parts = []
    if quantization.get("int8_format") == "dynamic":
        parts.append("DynamicQuantizeMatMul")
    elif quantization.get("int8_format") == "rowwise":
        parts.append("MatMulInteger, activations per row")
    else:
        parts.append(f"block {quantization.get('block_size')}")
    parts.append("symmetric" if quantization.get("symmetric") else "asymmetric")
    parts.append(f"accuracy_level {quantization.get('accuracy_level')}")
    if quantization.get("head_bits") not in (None, bits):
        parts.append(f"{quantization['head_bits']}-bit embedding/head")
    return f"int{bits} ({', '.join(parts)})"


_INT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "num_image_tokens",
               "image_size", "image_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "opset")
_REQUIRED = ("format_version", "graphs", *_INT_FIELDS, "image_mean", "image_std", "dtype", "quantization",
             "tokenizer")


def _validate(d: dict, path: Path) -> None:
    def bad(what: str) -> PgExportError:
        return PgExportError(f"{path}: {what}; re-export the folder (pgexport onnx ...)")

    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    graphs = d["graphs"]
    if not isinstance(graphs, dict) or any(not isinstance(graphs.get(k), str) or not graphs.get(k) for k in GRAPH_KEYS):
        raise bad(f"'graphs' must map {', '.join(GRAPH_KEYS)} to file names, got {graphs!r}")
    if any(k in graphs and (not isinstance(graphs[k], str) or not graphs[k]) for k in OPTIONAL_GRAPH_KEYS):
        raise bad(f"'graphs' entries must be file names, got {graphs!r}")
    for k in _INT_FIELDS:
        if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 0:
            raise bad(f"{k} must be a non-negative integer, got {d[k]!r}")
    for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "num_image_tokens", "image_size"):
        if d[k] == 0:
            raise bad(f"{k} is 0")
    for k in ("image_mean", "image_std"):
        v = d[k]
        if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise bad(f"{k} must be a list of 3 numbers, got {v!r}")
    if any(x == 0 for x in d["image_std"]):
        raise bad(f"image_std has a zero: {d['image_std']!r}")
    if d["dtype"] not in DTYPES:
        raise bad(f"dtype {d['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(d["tokenizer"], str) or not d["tokenizer"]:
        raise bad(f"tokenizer must be a file name, got {d['tokenizer']!r}")
    if not isinstance(d["quantization"], (str, dict)):
        raise bad(f"quantization must be a string or an object, got {d['quantization']!r}")


def _inside(folder: Path, name: str, what: str) -> Path:
    """A file name from the manifest, refused if it leaves the folder."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise PgExportError(f"{folder / MANIFEST_FILE}: {what} {name!r} is not a plain file name inside the folder; "
                            "re-export the folder")
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise PgExportError(f"{folder / MANIFEST_FILE}: {what} {name!r} resolves outside {folder}; re-export the folder")
    return folder / name


def read_manifest(folder: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate `folder/pgexport.json`; with `check_files`, the graph and tokenizer files must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not an export folder" if folder.exists() else "not found"
        raise PgExportError(f"export folder {folder} {what}; pass the folder written by `pgexport onnx`")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PgExportError(f"{path} not found: {folder} is not a pgexport ONNX export; "
                            "create one with `pgexport onnx --model ... --out DIR`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PgExportError(f"{path} is corrupt ({e}); re-export the folder (pgexport onnx ...)") from None
    if not isinstance(d, dict):
        raise PgExportError(f"{path} is corrupt (not a JSON object); re-export the folder (pgexport onnx ...)")
    version = d.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise PgExportError(f"{path}: format_version {version!r} is missing or not an integer; re-export the folder")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = version > FORMAT_VERSION
        raise PgExportError(f"{path}: format_version {version} is not supported (this pgexport reads "
                            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                            + ("upgrade pgexport" if newer else "re-export the folder"))
    _validate(d, path)
    known = {f.name for f in dataclasses.fields(Manifest)}
    manifest = Manifest(**{k: v for k, v in d.items() if k in known})  # unknown fields: ignored
    if check_files:
        for key in [*GRAPH_KEYS, *(k for k in OPTIONAL_GRAPH_KEYS if k in manifest.graphs)]:
            graph = _inside(folder, manifest.graphs[key], f"graph {key}")
            if not graph.is_file():
                raise PgExportError(f"graph file {graph} ({key}) is missing; copy the whole export folder or re-export it")
        tok = _inside(folder, manifest.tokenizer, "tokenizer")
        if not tok.is_file():
            raise PgExportError(f"tokenizer file {tok} is missing; copy the whole export folder or re-export it")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `folder/pgexport.json` atomically (a temporary file renamed over it)."""
    folder = Path(folder)
    d = manifest.to_dict()
    _validate(d, folder / MANIFEST_FILE)
    text = json.dumps(d, indent=2) + "\n"
    return write_text_atomic(folder / MANIFEST_FILE, text)
