"""Export for transformers.js (`@huggingface/transformers`): the folder its PaliGemma class loads.

    >>> from pgexport.exporters.transformersjs import export_transformersjs
    >>> export_transformersjs("path/to/paligemma-3b-pt-224", "exports/pg-224-web", quants=("int4",))  # doctest: +SKIP

transformers.js runs a PaliGemma (`PaliGemmaForConditionalGeneration`, a Llava subclass) as three
sessions, each `onnx/<name><suffix>.onnx` with its weights in `<that file>_data`:

    vision_encoder         pixel_values [batch_size, 3, size, size] float32
                           -> image_features [batch_size, num_image_tokens, hidden]
    embed_tokens           input_ids [batch_size, sequence_length] int64
                           -> inputs_embeds [batch_size, sequence_length, hidden] (times sqrt(hidden))
    decoder_model_merged   inputs_embeds [batch_size, sequence_length, hidden],
                           attention_mask [batch_size, total_sequence_length] int64,
                           past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head_dim]
                           -> logits [batch_size, 1, vocab] float32 (last real token of each row),
                              present.{i}.key|value [.., past_sequence_length + sequence_length, ..]

The library writes the image features over the `<image>` rows of `inputs_embeds` itself (so the
features stay unscaled and the text embeddings carry Gemma's factor, as in the model), starts
with an empty past (`batch_size` resolved, every other symbolic axis 0), then feeds one token per
call and the concatenated cache back. It passes no `token_type_ids`, and from the second call on
its `attention_mask` is all ones over the past: the padding of a batch is lost. The decoder
therefore keeps what it needs in the cache:

* layer 0's key cache has one channel more than `head_dim`: 1.0 where the slot holds a real token,
  0.0 for padding (written from the first call's `attention_mask`, the only one that knows it).
  Positions (real tokens counted, 1-based), the padding mask and Gemma 2's sliding window (in real
  tokens) all derive from it, so a padded batch generates what each row generates alone;
* a call with an empty past is the prompt: its real tokens form PaliGemma's bidirectional prefix
  (image and prompt see each other); tokens of later calls are causal.

The graphs wrap the same eager modules as `graphs.py` (the decoder with a `ConcatKVCache`).
Precisions sit side by side in `onnx/` under transformers.js's suffixes: fp32 "", fp16 "_fp16",
int8 "_quantized" (its `q8`), int4 "_q4" (the quantizer of `quantize.py`: MatMulNBits, and the
embedding table as GatherBlockQuantized in embed_tokens and MatMulNBits in the head).
`config.json` is the model's Hugging Face config plus `transformers.js_config` (the external data
files, needed in the browser, and the default dtype).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim

from pgexport import __version__
from pgexport.errors import PgExportError
from pgexport.exporters.graphs import VisionEncoderGraph, past_names, present_names
from pgexport.exporters.onnx_export import (DEFAULT_OPSET, EXPORT_DTYPES, SharedExternalData, check_source_shapes,
                                            export_graph, fake_model, open_source)
from pgexport.exporters.pipeline import ExportValidationError
from pgexport.exporters.quantize import QuantOptions, quantize_folder
from pgexport.exporters.transformersjs_check import validate_transformersjs
from pgexport.files import move_into_place, staging_folder
from pgexport.models.kv_cache import ConcatKVCache
from pgexport.models.paligemma import PaliGemma, last_token_index, positions_from_mask
from pgexport.processing.image import write_preprocessor_config
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.processing.tokenizer import SentencePieceTokenizer, save_tokenizer
from pgexport.runtime.onnx_files import check_external_data

ONNX_DIR = "onnx"
SESSIONS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# pgexport precision -> (transformers.js dtype, file suffix); see its DEFAULT_DTYPE_SUFFIX_MAPPING.
DTYPES = {"fp32": ("fp32", ""), "fp16": ("fp16", "_fp16"), "int8": ("q8", "_quantized"), "int4": ("q4", "_q4")}
BATCH = "batch_size"  # the name transformers.js resolves when it builds the empty past
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
LOGITS = "logits"


def onnx_file(session: str, quant: str) -> str:
    """`onnx/<session><suffix>.onnx`, relative to the folder."""
    return f"{ONNX_DIR}/{session}{DTYPES[quant][1]}.onnx"


def data_file(session: str, quant: str) -> str:
    """The graph's weights, named the way transformers.js looks for them (`<file>.onnx_data`)."""
    return f"{onnx_file(session, quant)}_data"


def _pairs(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


class TjsVisionGraph(VisionEncoderGraph):
    """The vision encoder of `graphs.py` with transformers.js's batch axis name."""

    def dynamic_shapes(self) -> dict:
        return {"pixel_values": {0: Dim(BATCH)}}


class EmbedTokensGraph(nn.Module):
    """input_ids -> Gemma's scaled text embeddings (`<image>` rows: pad's, overwritten by the caller)."""

    input_names = ["input_ids"]
    output_names = ["inputs_embeds"]

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def example_inputs(self) -> tuple:
        return (torch.full((2, 5), 3, dtype=torch.long),)

    def dynamic_shapes(self) -> dict:
        return {"input_ids": {0: Dim(BATCH), 1: Dim(SEQ)}}


class MergedDecoderGraph(nn.Module):
    """Prompt (empty past) and decode steps in one graph over a growing cache; see the module docstring."""

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model
        n = model.cfg.text.num_hidden_layers
        self.input_names = ["inputs_embeds", "attention_mask", *past_names(n)]
        self.output_names = [LOGITS, *present_names(n)]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_key_values: list[torch.Tensor]):
        m = self.model
        past = _pairs(past_key_values)
        key0 = past[0][0]  # [B, Hkv, P, Dh + 1]
        past_real = key0[:, 0, :, -1] > 0.5  # [B, P]: slots holding real tokens
        past[0] = (key0[..., :-1], past[0][1])
        P, S = key0.shape[2], inputs_embeds.shape[1]
        new_real = attention_mask[:, attention_mask.shape[1] - S:].bool()  # [B, S]: only these columns are trusted
        real = torch.cat([past_real, new_real], 1)  # [B, P + S]
        # An empty past is the prompt call: its real tokens are the bidirectional prefix. A sum
        # over the past's slots (0 when there are none) keeps this a tensor op, not a traced branch.
        prompt_call = torch.ones_like(past_real[0], dtype=torch.long).sum() == 0
        q_prefix = new_real & prompt_call
        kv_prefix = torch.cat([torch.zeros_like(past_real), q_prefix], 1)
        q_slots = torch.arange(P, P + S, device=inputs_embeds.device)
        masks = m.masks(q_slots, real, kv_prefix, q_prefix)
        positions = positions_from_mask(real)[:, P:]  # [B, S], 1-based real-token count
        cache = ConcatKVCache(past)
        hidden = m.language_model(inputs_embeds, positions, masks, cache, slot=P)  # [B, S, D]
        last = last_token_index(new_real)  # [B]
        rows = torch.gather(hidden, 1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]  # [B, D]
        # The head on 2-D rows is a Gemm(transB=1) on the table itself, as in the default layout's
        # graphs: the quantizer then stores the table as the default layout's embedding/head table.
        logits = m.language_model.logits(rows, out_dtype=torch.float32)[:, None]  # [B, 1, V]
        k0, v0 = cache.present[0]
        flags = real[:, None, :, None].to(k0.dtype).expand(-1, k0.shape[1], -1, 1)  # [B, Hkv, P + S, 1]
        presents = [(torch.cat([k0, flags], -1), v0), *cache.present[1:]]
        return (logits, *[t for kv in presents for t in kv])

    def example_inputs(self, batch: int = 2, past: int = 7, seq: int = 5) -> tuple:
        t = self.model.cfg.text
        dtype = self.model.dtype
        embeds = torch.zeros(batch, seq, t.hidden_size, dtype=dtype)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        kv = [torch.zeros(batch, t.num_key_value_heads, past, t.head_dim + (i == 0), dtype=dtype)
              for i in range(2 * t.num_hidden_layers)]
        return embeds, mask, kv

    def dynamic_shapes(self) -> dict:
        batch, seq, past, total = Dim(BATCH), Dim(SEQ), Dim(PAST), Dim(TOTAL)
        n = self.model.cfg.text.num_hidden_layers
        return {
            "inputs_embeds": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "past_key_values": [{0: batch, 2: past} for _ in range(2 * n)],
        }


GRAPHS = {"vision_encoder": TjsVisionGraph, "embed_tokens": EmbedTokensGraph, "decoder_model_merged": MergedDecoderGraph}


def export_transformersjs(
    model: PaliGemma | str | os.PathLike,
    out_dir: str | os.PathLike,
    processor: PaliGemmaProcessor,
    quants: tuple[str, ...] = ("fp32",),
    opset: int | None = None,
    validate: bool = True,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    quant_options: dict | None = None,
    source: dict | None = None,
    max_new_tokens: int = 16,
) -> dict:
    """Write a transformers.js folder for `model` (a checkpoint folder or a `PaliGemma`).

    `quants`: the precisions to write side by side in `onnx/` ("fp32", "fp16", "int8", "int4");
    the first is `config.json`'s default dtype. The float32 graphs are traced once; int8 / int4
    quantize copies of them (`quant_options`: `QuantOptions.create`'s keywords). `processor`
    gives the tokenizer (a `tokenizer.json`: transformers.js cannot read `tokenizer.model`) and
    the image settings. With `validate`, every precision is run the way transformers.js runs it
    and compared with eager PyTorch (`transformersjs_check.py`); a failure keeps the folder and
    raises `ExportValidationError`.

    Returns {"out_dir", "files" {relative path: bytes}, "total_bytes", "reports" {quant: report}}.
    """
    say = progress or (lambda _m: None)
    quants = tuple(dict.fromkeys(str(q).lower() for q in quants))
    unknown = [q for q in quants if q not in DTYPES]
    if unknown or not quants:
        raise PgExportError(f"unknown --quant {', '.join(unknown) or '(none)'}; choose fp32, fp16, int8 or int4")
    int_options = {q: QuantOptions.create(q, **(quant_options or {})) for q in quants if q in ("int8", "int4")}
    if quant_options and not int_options:
        raise PgExportError("quantization options apply to --quant int8 / int4")
    if isinstance(processor.tokenizer, SentencePieceTokenizer):
        raise PgExportError("transformers.js reads tokenizer.json, and this checkpoint has only tokenizer.model; "
                            "add the tokenizer.json of the original PaliGemma checkpoint to the folder")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PgExportError(f"{out_dir} is a file; choose another --out folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PgExportError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    cfg, tensors = open_source(model)
    if cfg.vision.image_size != processor.image_size or cfg.num_image_tokens != processor.num_image_tokens:
        raise PgExportError(f"the processor ({processor.image_size} px, {processor.num_image_tokens} image tokens) "
                            f"does not match the model ({cfg.vision.image_size} px, {cfg.num_image_tokens} tokens); "
                            "fix preprocessor_config.json of the checkpoint")

    staging = staging_folder(out_dir)
    folder = staging / out_dir.name
    (folder / ONNX_DIR).mkdir(parents=True)
    reports = {}
    try:
        floats = [q for q in quants if q in ("fp32", "fp16")] + (["fp32"] if int_options and "fp32" not in quants else [])
        for quant in floats:
            _trace(cfg, tensors, folder, quant, opset or DEFAULT_OPSET, say)
        for quant, options in int_options.items():
            _quantize_copy(folder, quant, options, say)
        if "fp32" not in quants:
            for session in SESSIONS:
                (folder / onnx_file(session, "fp32")).unlink()
                (folder / data_file(session, "fp32")).unlink()
        _write_configs(folder, cfg, processor, quants, source, model)
        if validate:
            reference = model if isinstance(model, PaliGemma) else Path(model)
            for quant in quants:
                say(f"validating {quant}: the graphs run as transformers.js runs them, vs eager PyTorch")
                files = {s: folder / onnx_file(s, quant) for s in SESSIONS}
                bits = int_options[quant].bits if quant in int_options else None
                dtype = "float16" if quant == "fp16" else "float32"
                reports[quant] = validate_transformersjs(files, bits, dtype, reference, processor,
                                                         max_new_tokens=max_new_tokens)
            (folder / "export_report.json").write_text(json.dumps(reports, indent=2) + "\n")
        move_into_place(folder, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    failed = [f"{q}: {'; '.join(r['failures'])}" for q, r in reports.items() if not r["passed"]]
    if failed:
        raise ExportValidationError(f"validation failed ({' | '.join(failed)}); the export was kept, see "
                                    f"{out_dir / 'export_report.json'}")
    say(f"wrote {out_dir}: {sum(files.values()) / 2**20:.1f} MiB")
    return {"out_dir": str(out_dir), "files": files, "total_bytes": sum(files.values()), "reports": reports}


# ---------------------------------------------------------------------------- pieces
def _trace(cfg, tensors, folder: Path, quant: str, opset: int, say) -> None:
    """The three graphs at float precision `quant`, each with its own data file."""
    dtype = EXPORT_DTYPES["float16" if quant == "fp16" else "float32"]
    fake_mode, fake = fake_model(cfg, dtype)
    check_source_shapes(tensors, fake)
    for session, wrapper in GRAPHS.items():
        say(f"exporting {onnx_file(session, quant)}")
        graph = export_graph(wrapper(fake), opset, tensors, dtype, fake_mode)
        # Locations are relative to the graph, which sits in onnx/.
        store = SharedExternalData(folder / ONNX_DIR, Path(data_file(session, quant)).name)
        store.add(graph)
        store.finish()
        ir.save(graph, folder / onnx_file(session, quant))
        onnx.checker.check_model(str(folder / onnx_file(session, quant)))
        check_external_data(folder / onnx_file(session, quant))


def _quantize_copy(folder: Path, quant: str, options: QuantOptions, say) -> None:
    """int8 / int4 graphs from the fp32 ones: quantized in a scratch folder, renamed to `quant`'s files."""
    scratch = folder / f".{quant}"
    scratch.mkdir()
    try:
        for session in SESSIONS:
            # The quantizer keeps each graph's data-file name: give the copy its final one.
            proto = onnx.load(str(folder / onnx_file(session, "fp32")), load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = Path(data_file(session, quant)).name
            onnx.save(proto, str(scratch / Path(onnx_file(session, quant)).name))
            shutil.copyfile(folder / data_file(session, "fp32"), scratch / Path(data_file(session, quant)).name)
        say(f"quantizing the {quant} graphs (block {options.block_size})")
        quantize_folder(scratch, options)  # its size summary counts `.onnx.data` files, not these
        for path in scratch.iterdir():
            os.replace(path, folder / ONNX_DIR / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_configs(folder: Path, cfg, processor: PaliGemmaProcessor, quants, source, model) -> None:
    """config.json (+ transformers.js_config), generation_config.json, tokenizer, preprocessor config."""
    config = cfg.to_hf_dict()
    config["transformers.js_config"] = {
        "dtype": DTYPES[quants[0]][0],
        # The browser fetches external data only for the files named here (Node finds them itself).
        "use_external_data_format": {Path(onnx_file(s, q)).name: 1 for q in quants for s in SESSIONS},
    }
    config["pgexport"] = {"version": __version__, "layout": "transformers.js",
                          "source": source or {"model": Path(model).resolve().name if not isinstance(model, PaliGemma)
                                               else type(model).__name__}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(processor.tokenizer, folder)
    # transformers.js's PaliGemma processor writes `<bos>` into the text itself and tokenizes it with
    # the tokenizer's post-processor on (Python's switches bos adding off): without this, a second
    # `<bos>` would start every prompt.
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    write_preprocessor_config(folder, processor.image_size, processor.num_image_tokens, processor.mean,
                              processor.std, processor.resample)
