"""The `pgexport` command line.

Every command turns bad input into one line on stderr and exit code 1 (2 for usage errors);
`pgexport --debug COMMAND` shows the traceback instead.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import tempfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
from PIL import Image

from pgexport.bench.report import compare_files
from pgexport.bench.run import parse_backends, run_bench
from pgexport.batch.job import ENGINES, run_batch
from pgexport.batch.model import resolve_export
from pgexport.bundled import DEMO_DIR, SAMPLE_IMAGE, default_model
from pgexport.errors import PgExportError
from pgexport.processing.detection import draw_detections, parse_detections
from pgexport.processing.image import load_image
from pgexport.runtime.generation import Sampling
from pgexport.runtime.manifest import describe_quantization
from pgexport.runtime.onnx_files import describe_export
from pgexport.runtime.session import OnnxPaliGemma
from pgexport.train.dataset import write_dataset

# Commands that need PyTorch (the `export` extra) import the eager side inside the command, so
# that `pgexport generate --backend onnx` and `pgexport inspect` run on the base install; `serve`
# imports its HTTP stack (the `serve` extra) inside the command for the same reason.
SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client", "anyio")


class _Group(click.Group):
    """Runs a command and reports a `PgExportError` (or a missing extra) as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PgExportError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if e.name and e.name.split(".")[0] in ("torch", "onnxscript", "optimum", "sentencepiece"):
                click.echo(f"error: this command needs {e.name}; install it with: pip install 'pgexport[export]'", err=True)
                sys.exit(1)
            if e.name and e.name.split(".")[0] in SERVE_PACKAGES:
                click.echo(f"error: pgexport serve needs {e.name}; install it with: pip install 'pgexport[serve]'", err=True)
                sys.exit(1)
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


class _OneLineUsage(click.Command):
    """A command whose usage errors (a bad option value) are one line: "Error: ... (see --help)"."""

    @staticmethod
    def _one_line(e: click.UsageError, ctx: click.Context | None) -> click.UsageError:
        ctx = e.ctx or ctx
        if ctx is not None:
            e.message = f"{e.message} (see '{ctx.command_path} --help')"
        e.ctx = None  # click prints the usage block above the error when it has a context
        return e

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise self._one_line(e, None) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise self._one_line(e, ctx) from None


def _block_size(ctx, param, value):
    if value is not None and (value < 16 or value & (value - 1)):
        raise click.BadParameter(f"{value} is not a power of two >= 16 (16, 32, 64, 128, ...)", ctx=ctx, param=param)
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool):
    """PaliGemma from PyTorch to production runtimes.

    \b
    Example:
      pgexport init --preset paligemma-tiny --out tiny
      pgexport generate --model tiny --image cat.jpg --prompt "caption en"
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.option("--preset", required=True, help="Preset name, e.g. paligemma-3b-pt-224 or paligemma2-tiny.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the weights.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
def init(preset: str, out: str, seed: int, dtype: str):
    """Write a random-weight checkpoint in the Hugging Face layout.

    The folder holds config.json, model.safetensors (sharded above 2 GiB), tokenizer.json and
    preprocessor_config.json, like a published PaliGemma checkpoint.

    \b
    Example:
      pgexport init --preset paligemma2-tiny --out tiny2 --seed 1
    """
    from pgexport.api import init_checkpoint
    from pgexport.models.config import PRESETS

    if preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}", param_hint="--preset")
    init_checkpoint(preset, out, seed=seed, dtype=dtype, progress=_progress)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--model", "model_spec", default=None, help="Checkpoint folder or preset (default: the built-in model).")
@click.option("--image", "image_path", default=None, type=click.Path(dir_okay=False), help="Input image (default: a bundled sample).")
@click.option("--prompt", default="caption en", show_default=True, help='Task prefix, e.g. "caption en", "detect circle".')
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="torch: eager PyTorch (checkpoint or preset); onnx: ONNX Runtime on an export folder (no torch).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-k", default=None, type=click.IntRange(min=1), help="Sample from the k most likely tokens.")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling.")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--draw", default=None, type=click.Path(dir_okay=False), help="For detect prompts: save the image with boxes here.")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
def generate(model_spec, image_path, prompt, max_new_tokens, backend, device, dtype, temperature, top_k, top_p, seed, draw,
             stream):
    """Generate text for one image and prompt; prints boxes for `detect` prompts.

    With --backend onnx, --model is an export folder (pgexport onnx) and PyTorch is not needed.

    \b
    Example:
      pgexport generate --model paligemma-3b-pt-224 --image cat.jpg --prompt "detect cat" --draw out.png
      pgexport generate --backend onnx --model exports/pg-224 --image cat.jpg --prompt "caption en" --stream
    """
    if draw:
        _check_writable_image(draw)  # before the slow part, not after it
    image = load_image(image_path or SAMPLE_IMAGE)
    sampling = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) if temperature > 0 else None
    if backend == "onnx":  # ONNX Runtime only: nothing here may import torch
        pieces = _generate_onnx(model_spec, device, dtype, image, prompt, max_new_tokens, sampling, stream)
    else:
        from pgexport.api import generate as run_generate
        from pgexport.api import generate_stream, load_model, load_processor

        model = load_model(model_spec, dtype=dtype, device=device)
        processor = load_processor(model_spec)
        pieces = (generate_stream(model, processor, image, prompt, max_new_tokens=max_new_tokens, sampling=sampling)
                  if stream else run_generate(model, processor, [image], [prompt], max_new_tokens=max_new_tokens,
                                              sampling=sampling))
    if stream:
        text = ""
        for piece in pieces:  # as the tokens arrive
            click.echo(piece, nl=False)
            sys.stdout.flush()
            text += piece
        click.echo()
    else:
        text = pieces[0]
        click.echo(text)
    if prompt.startswith("detect"):
        detections = parse_detections(text, image.width, image.height)
        for d in detections:
            x0, y0, x1, y1 = d.box
            click.echo(f"{d.label or '(no label)'}: x0={x0:.0f} y0={y0:.0f} x1={x1:.0f} y1={y1:.0f}")
        if draw:
            try:
                draw_detections(image, detections).save(draw)
            except (OSError, ValueError, KeyError) as e:
                raise PgExportError(f"cannot write {draw}: {e}; choose another --draw path") from None
            click.echo(f"wrote {draw}")


def _generate_onnx(export_dir, device, dtype, image, prompt, max_new_tokens, sampling, stream: bool):
    """`generate --backend onnx`: OnnxPaliGemma on an export folder (torch-free); the text as a
    one-element list, or with `stream` an iterator of its pieces."""
    if not export_dir:
        raise PgExportError("--backend onnx needs --model EXPORT_DIR, a folder written by `pgexport onnx`")
    if dtype not in ("float32", "fp32"):
        raise PgExportError(f"--dtype {dtype} does not apply to --backend onnx: an export's dtype is fixed when it is "
                            "written (pgexport onnx --quant ...); leave --dtype out")
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda") or (index and not index.isdigit()) or (name == "cpu" and index):
        raise PgExportError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    model = OnnxPaliGemma(export_dir, provider=name, device_id=int(index or 0))
    if stream:
        return model.generate_stream(image, prompt, max_new_tokens=max_new_tokens, sampling=sampling)
    return model.generate([image], [prompt], max_new_tokens=max_new_tokens, sampling=sampling)


def _check_writable_image(path: str) -> None:
    """--draw must name an image format Pillow can write, in an existing folder."""
    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in Image.SAVE:
        raise click.BadParameter(f"Pillow cannot write {Path(path).suffix or 'a file without extension'} "
                                 f"images ({path}); use .png or .jpg", param_hint="--draw")
    if not Path(path).absolute().parent.is_dir():
        raise PgExportError(f"cannot write {path}: folder {Path(path).parent} does not exist; create it first")


def _progress(message: str) -> None:
    """Progress lines on a terminal only (keeps piped output clean)."""
    if sys.stderr.isatty():
        click.echo(message, err=True)


# ----------------------------------------------------------------------------- onnx / inspect
@main.command("onnx", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None, help="Checkpoint folder or preset (default: the built-in model).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Export folder to write (must be empty or absent).")
@click.option("--quant", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True,
              help="fp32; fp16 (half the size; Gemma 2 may lose accuracy); int8 / int4: float32 graphs with "
                   "block-quantized weights (linear layers, embedding and tied head).")
@click.option("--block-size", type=int, default=None, callback=_block_size,
              help="int8/int4: weights per quantization block, a power of two >= 16 (default 128; 32 is a little more accurate for int4, and slower).")
@click.option("--symmetric/--asymmetric", default=None,
              help="int8/int4: symmetric blocks (no zero points) or a zero point per block (default: int8 symmetric, "
                   "int4 asymmetric).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="int8/int4: MatMulNBits accuracy_level, 0 (unset) .. 4 (int8 activations, fastest on CPU; default 4).")
@click.option("--int8-format", type=click.Choice(["nbits", "dynamic", "rowwise"]), default=None,
              help="int8: linear layers as MatMulNBits (CPU and CUDA), DynamicQuantizeMatMul (fastest on CPU) or "
                   "MatMulInteger with activations quantized per row (rowwise: answers that do not depend on the "
                   "batch, for pgexport serve); default: dynamic for --target cpu, nbits for cuda.")
@click.option("--head-bits", type=click.Choice(["4", "8"]), default=None,
              help="Bits of the shared embedding / LM-head table (default: those of --quant; 8 keeps the head "
                   "accurate in an int4 export).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="int8/int4: the provider the export is meant for (picks the int8 format).")
@click.option("--opset", type=click.IntRange(min=18), default=None, help="ONNX opset (default: the exporter's, 20).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check (export_report.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (only once the new one is complete).")
@click.option("--layout", type=click.Choice(["pgexport", "transformers.js"]), default="pgexport", show_default=True,
              help="pgexport: the graphs + pgexport.json this toolkit's runtime reads; transformers.js: the folder "
                   "@huggingface/transformers loads (docs/transformersjs.md).")
def onnx_command(model_spec, out, quant, block_size, symmetric, accuracy_level, int8_format, head_bits, target, opset,
                 no_validate, overwrite, layout):
    """Export to a self-contained ONNX folder (three graphs, manifest, tokenizer).

    Writes OUT/pgexport.json, vision_encoder.onnx, prefill.onnx, decode.onnx with their .data
    files, the tokenizer and preprocessor_config.json, then runs the graphs under ONNX Runtime
    on a sample and compares with PyTorch (OUT/export_report.json). The folder runs without
    pgexport's PyTorch side: `pgexport generate --backend onnx --model OUT`.

    With --quant int8 / int4 the weights are quantized after export (MatMulNBits /
    DynamicQuantizeMatMul for the linear layers, GatherBlockQuantized + MatMulNBits on one shared
    table for the embedding and tied head) and the validation gates on accuracy against fp32
    PyTorch (teacher-forced top-1 agreement, KL divergence, logit cosine).

    \b
    Example:
      pgexport onnx --model paligemma-3b-pt-224 --out exports/pg-224
      pgexport onnx --model my-finetuned --out exports/ft --quant fp16 --no-validate
      pgexport onnx --model paligemma-3b-pt-224 --out exports/pg-int4 --quant int4 --block-size 32
      pgexport onnx --layout transformers.js --quant int4 --out exports/demo-web
    """
    from pgexport.api import export
    from pgexport.exporters.pipeline import INT_QUANTS, REPORT_FILE

    options = {"block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
               "int8_format": int8_format, "head_bits": int(head_bits) if head_bits else None}
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
    if quant not in INT_QUANTS and given:
        raise click.UsageError(f"{', '.join(given)}: only for --quant int8 / int4, not --quant {quant}")
    if quant == "int4" and int8_format is not None:
        raise click.UsageError("--int8-format applies to --quant int8")
    if quant == "int8" and head_bits == "4":
        raise click.UsageError("--head-bits 4 with --quant int8: the table cannot have fewer bits than the layers")
    quant_options = {k: v for k, v in options.items() if v is not None}
    if quant in INT_QUANTS:
        quant_options["target"] = target
    result = export(model_spec, out, quant=quant, opset=opset, validate=not no_validate, layout=layout,
                    progress=_progress, overwrite=overwrite, quant_options=quant_options or None)
    click.echo(f"wrote {out} ({result['total_bytes'] / 2**20:.1f} MiB, {quant})")
    if layout == "transformers.js":
        for report in result["reports"].values():
            click.echo(f"validation passed: max logit difference {report['logits_max_abs_diff']:.2e}, teacher-forced "
                       f"top-1 agreement {report['quality']['top1_agreement']:.1%}, greedy agreement "
                       f"{report['greedy_agreement']:.0%} ({Path(out) / 'export_report.json'})")
        return
    q = result.get("quantization")
    if q:
        click.echo(f"quantized: {q['bytes_after'] / 2**20:.1f} MiB of graphs and weights, "
                   f"{q['bytes_after'] / q['bytes_before']:.3f}x the fp32 export")
    report = result["report"]
    if report is not None:
        extra = ""
        if report.get("gates"):
            qual = report["quality"]
            extra = (f", teacher-forced top-1 agreement {qual['top1_agreement']:.1%}, mean KL {qual['mean_kl']:.2e}, "
                     f"logit cosine {qual['mean_cosine']:.4f}")
        click.echo(f"validation passed: max logit difference {report['logits_max_abs_diff']:.2e}, greedy agreement "
                   f"{report['greedy_agreement']:.0%} over {report['greedy_tokens']} tokens{extra} "
                   f"({Path(out) / REPORT_FILE})")


@main.command("inspect")
@click.argument("export_dir", type=click.Path())
def inspect_command(export_dir):
    """Show an export folder: graphs, inputs/outputs with shapes, file sizes, dtype, quantization.

    \b
    Example:
      pgexport inspect exports/pg-224
    """
    info = describe_export(export_dir)
    m = info["manifest"]
    click.echo(f"{info['folder']}: pgexport export, format {m['format_version']}, {m['model_type']}, dtype {m['dtype']}, "
               f"quantization {describe_quantization(m['quantization'])}, opset {m['opset']}, {_size(info['total_bytes'])}")
    click.echo(f"  decoder: {m['num_layers']} layers, {m['num_kv_heads']} KV heads x {m['head_dim']}, hidden "
               f"{m['hidden_size']}, vocab {m['vocab_size']}, context {m.get('max_position_embeddings')}")
    click.echo(f"  image: {m['image_size']} px -> {m['num_image_tokens']} tokens, mean {m['image_mean']}, std "
               f"{m['image_std']}; tokenizer {m['tokenizer']}; ids: image {m['image_token_id']}, bos "
               f"{m['bos_token_id']}, eos {m['eos_token_id']}, pad {m['pad_token_id']}")
    for key, g in info["graphs"].items():
        data = ", ".join(f"{name} {_size(size)}" for name, size in g["data_files"].items()) or "no external data"
        click.echo(f"{key}: {g['file']} {_size(g['bytes'])} + {data} ({g['external_tensors']} tensors), {g['nodes']} nodes")
        for kind in ("inputs", "outputs"):
            for name, dtype, dims in _collapse_layers(g[kind]):
                click.echo(f"  {kind[:-1]:<6} {name:<34} {dtype:<8} [{', '.join(map(str, dims))}]")
    click.echo("files: " + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _collapse_layers(entries):
    """past_key_values.{0..N-1}.key|value (same type and shape) as one line."""
    out, groups = [], {}
    for name, dtype, dims in entries:
        m = re.fullmatch(r"(past_key_values|present)\.(\d+)\.(key|value)", name)
        if not m:
            out.append((name, dtype, dims))
            continue
        key = (m.group(1), dtype, tuple(dims))
        if key not in groups:
            groups[key] = len(out)
            out.append([m.group(1), dtype, dims, 0])
        out[groups[key]][3] += 1
    result = []
    for entry in out:
        if isinstance(entry, list):
            prefix, dtype, dims, count = entry
            result.append((f"{prefix}.{{0..{count // 2 - 1}}}.key|value", dtype, dims))
        else:
            result.append(entry)
    return result


# ----------------------------------------------------------------------------- quantize (PyTorch)
@main.command("quantize", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None, help="Checkpoint folder or preset (default: the built-in model).")
@click.option("--quant", type=click.Choice(["int8", "int4"]), required=True, help="Weight type of the linear layers.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must be empty or absent).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (only once the new one is complete).")
def quantize_command(model_spec, quant, out, overwrite):
    """Quantize the linear layers for the PyTorch backend (optimum-quanto int8 / int4 weights).

    Writes OUT/quantized_model.safetensors (no pickle), OUT/quantization_map.json, config.json,
    the tokenizer and preprocessor config. `pgexport generate --model OUT` runs it (built on the
    meta device: the float linear weights are never materialized). The embedding and the tied
    LM head stay float32 (quanto has no quantized embedding). For ONNX Runtime use
    `pgexport onnx --quant int8|int4` on the float checkpoint instead.

    \b
    Example:
      pgexport quantize --model paligemma-3b-pt-224 --quant int8 --out pg-int8
      pgexport generate --model pg-int8 --prompt "caption en"
    """
    from pgexport.api import quantize

    quantize(model_spec, out, quant=quant, overwrite=overwrite, progress=_progress)
    click.echo(f"wrote {out} ({quant}, optimum-quanto)")


# ----------------------------------------------------------------------------- dataset / finetune
@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must be empty or absent).")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed writes the same files.")
@click.option("--train", "n_train", default=2000, show_default=True, type=click.IntRange(min=0), help="Training images (4-5 examples each).")
@click.option("--val", "n_val", default=100, show_default=True, type=click.IntRange(min=0), help="Validation images.")
@click.option("--test", "n_test", default=200, show_default=True, type=click.IntRange(min=0), help="Test images.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(min=42), help="Image side in pixels.")
def dataset(out, seed, n_train, n_val, n_test, size):
    """Write the synthetic shapes dataset (captions, questions, detection) as JSONL + PNG.

    Writes OUT/train.jsonl, val.jsonl, test.jsonl (one {"image", "prefix", "suffix", "task"}
    object per line, image paths relative to OUT) and OUT/images/. Tasks: "caption en",
    "answer en <colour|count|position question>", "detect <shape>" with <locNNNN> boxes.

    \b
    Example:
      pgexport dataset --out shapes --seed 0 --train 2000 --val 100 --test 200
    """
    paths = write_dataset(out, seed=seed, train=n_train, val=n_val, test=n_test, size=size, progress=_progress)
    for split, path in paths.items():
        click.echo(f"wrote {path}")


@main.command()
@click.option("--model", "model_spec", default=None, help="Checkpoint folder or preset to start from (default: the built-in model).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training JSONL ({image, prefix, suffix} per line).")
@click.option("--val-data", default=None, type=click.Path(dir_okay=False), help="Validation JSONL (default: val.jsonl beside --data, if any).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (model + OUT/checkpoint for resuming).")
@click.option("--epochs", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after this many steps (overrides --epochs).")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup-steps", default=None, type=click.IntRange(min=0), help="Linear warm-up steps (default: 5% of the steps).")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Max gradient norm (0 = off).")
@click.option("--freeze-vision", is_flag=True, help="Keep the SigLIP tower fixed (the projector still trains).")
@click.option("--freeze-embeddings", is_flag=True, help="Keep the tied token embedding / LM head fixed.")
@click.option("--vision-lr-scale", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="The SigLIP tower's learning rate relative to --lr (e.g. 0.1: a pretrained tower adapts slowly).")
@click.option("--eval-every", default=None, type=click.IntRange(min=1), help="Validate (and checkpoint) every N steps.")
@click.option("--eval-examples", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--save-every", default=None, type=click.IntRange(min=1), help="Checkpoint every N steps (default: --eval-every).")
@click.option("--seed", default=0, show_default=True, help="Data-order seed.")
@click.option("--group-by-image", is_flag=True, help="Batch the examples of an image together (each image encoded once per step).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint if it exists.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--bf16/--no-bf16", default=None,
              help="bf16 autocast (fp32 master weights) [default: on CUDA and on CPUs with native bf16].")
def finetune(model_spec, data, val_data, out, epochs, max_steps, lr, batch_size, warmup_steps, weight_decay, grad_clip,
             freeze_vision, freeze_embeddings, vision_lr_scale, eval_every, eval_examples, save_every, seed, group_by_image, resume, device,
             bf16):
    """Fine-tune a model on JSONL data; the loss covers the suffix only (prefix-LM).

    Writes OUT/ in the Hugging Face layout (config.json, model.safetensors, tokenizer.json,
    preprocessor_config.json), OUT/checkpoint/ (weights, AdamW state, step: safetensors + JSON)
    and OUT/train_log.jsonl. Validation reports exact match and detection IoU.

    \b
    Example:
      pgexport dataset --out shapes
      pgexport finetune --data shapes/train.jsonl --out tuned --epochs 1 --lr 1e-4 --batch-size 8 --eval-every 200
      pgexport generate --model tuned --image shapes/images/test_000000.png --prompt "detect circle"
    """
    from pgexport.train.finetune import TrainConfig
    from pgexport.train.finetune import finetune as run_finetune

    if val_data is None and (Path(data).parent / "val.jsonl").is_file() and Path(data).name != "val.jsonl":
        val_data = str(Path(data).parent / "val.jsonl")
    config = TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, grad_clip=grad_clip, freeze_vision=freeze_vision,
                         freeze_embeddings=freeze_embeddings, vision_lr_scale=vision_lr_scale, eval_every=eval_every, eval_examples=eval_examples,
                         save_every=save_every, seed=seed, group_by_image=group_by_image, device=device,
                         bf16=bf16)
    run_finetune(model_spec or default_model(), data, out, val_data=val_data, config=config, resume=resume,
                 progress=lambda m: click.echo(m, err=True))


# ----------------------------------------------------------------------------- batch
@main.command("batch", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None,
              help="Export folder, or a checkpoint folder / preset (exported once into a cache) "
                   "(default: the built-in model).")
@click.option("--input", "input_spec", required=True, help="Folder of images, a quoted glob, FILE.jsonl or FILE.parquet.")
@click.option("--out", required=True, help="RESULTS.parquet or RESULTS.jsonl (one row per image and prompt).")
@click.option("--prompt", default="caption en", show_default=True, help="The prompt for every image.")
@click.option("--prompt-column", default=None, help="JSONL/Parquet column holding each row's prompt (instead of --prompt).")
@click.option("--image-column", default="image", show_default=True, help="JSONL/Parquet column with the image path or bytes.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this process; ray: Ray Data actors (pip install 'pgexport[ray]').")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per ONNX Runtime call.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model copies: threads (local) or Ray actors, each loading the export once.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Intra-op threads per worker (default: cores / workers).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime provider; with --engine ray each actor takes a GPU.")
@click.option("--address", default=None, help="--engine ray: join this Ray cluster (e.g. auto, ray://head:10001).")
@click.option("--resume", is_flag=True, help="Keep the rows already in --out (or left by a killed run) and run the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--chunk-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Rows per chunk written while the job runs (what a killed job keeps).")
def batch_command(model_spec, input_spec, out, prompt, prompt_column, image_column, engine, batch_size, workers, threads,
                  max_new_tokens, provider, address, resume, overwrite, chunk_size):
    """Run a model over a collection of images; one output row per (image, prompt).

    Rows hold the image id and path, the prompt, the text, pixel boxes for `detect` prompts, an
    error (an unreadable image becomes an error row; the job goes on) and the batch time. Rows
    are written in chunks as they finish, so a killed job keeps them and --resume continues it.
    See docs/batch.md.

    \b
    Example:
      pgexport batch --model exports/pg-224 --input photos/ --out captions.parquet --batch-size 16
      pgexport batch --input shapes/test.jsonl --prompt-column prefix --out answers.jsonl --resume
      pgexport batch --model exports/pg-224 --input "shots/**/*.jpg" --out boxes.parquet --prompt "detect car" \\
          --engine ray --workers 4 --address auto
    """
    if address and engine != "ray":
        raise click.UsageError("--address applies to --engine ray")
    summary = run_batch(model_spec, input_spec, out, prompt=prompt, prompt_column=prompt_column,
                        image_column=image_column, engine=engine, batch_size=batch_size, workers=workers,
                        threads=threads, max_new_tokens=max_new_tokens, provider=provider, resume=resume,
                        overwrite=overwrite, address=address, chunk_rows=chunk_size, progress=_progress)
    skipped = f", {summary['skipped']} kept from before" if summary["skipped"] else ""
    click.echo(f"wrote {out}: {summary['rows']} rows ({summary['processed']} run{skipped}, {summary['errors']} errors) "
               f"in {summary['seconds']:.1f} s, {summary['images_per_second']:.1f} images/s")


# ----------------------------------------------------------------------------- bench
@main.command("bench", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None,
              help="Checkpoint folder, preset, or an export folder (default: the built-in model).")
@click.option("--backends", default=None,
              help="Comma-separated: torch, torch-int8, torch-int4, onnx-fp32, onnx-fp16, onnx-int8, onnx-int4 "
                   "[default: torch,torch-int8,onnx-fp32,onnx-int8,onnx-int4].")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per backend (default: the libraries' own).")
@click.option("--images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inputs (image + prompt) per pass; the accuracy figures are computed over them (fewer = noisier).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=16, show_default=True, help="Tokens generated per input.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed passes (after one warm-up).")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Labelled JSONL (pgexport dataset): inputs from it, plus task accuracy per backend.")
@click.option("--examples", type=click.IntRange(min=1), default=200, show_default=True, help="Records of --data scored.")
@click.option("--reference", default=None, type=click.Path(file_okay=False),
              help="With an export folder as --model: the fp32 checkpoint to measure its accuracy against.")
@click.option("--cache", default=None, type=click.Path(file_okay=False),
              help="Where prepared variants are kept and reused [default: ~/.cache/pgexport/bench or $PGEXPORT_CACHE/bench].")
@click.option("--out", default="bench-report", show_default=True, type=click.Path(file_okay=False),
              help="Report folder: report.md, report.json, PNG plots.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--compare", nargs=2, default=None, type=click.Path(dir_okay=False), metavar="OLD.json NEW.json",
              help="Compare two reports instead of measuring; exit status 1 when a figure regressed.")
def bench_command(model_spec, backends, provider, threads, images, new_tokens, repeats, data, examples, reference, cache,
                  out, no_plots, compare):
    """Measure latency, memory and accuracy of each backend on this machine and recommend one.

    Each backend runs in its own process: load time, vision encoder, prefill (time to first
    token), per-token decode (median, p90, tokens/s), peak RSS, size on disk, and accuracy against
    the fp32 PyTorch model on the same inputs (top-1 agreement, KL, greedy match; with --data also
    task accuracy). Missing variants are exported once into the cache and reused.

    \b
    Example:
      pgexport bench --backends torch,onnx-fp32,onnx-int8,onnx-int4 --out report
      pgexport bench --model my-checkpoint --data shapes/test.jsonl --threads 4
      pgexport bench --compare old/report.json report/report.json
    """
    if compare:
        table, regressions = compare_files(*compare)
        click.echo(table)
        if regressions:
            click.echo(f"{len(regressions)} regression(s) beyond the measured spread:", err=True)
            for r in regressions:
                click.echo(f"  {r}", err=True)
            sys.exit(1)
        click.echo("no regression beyond the measured spread", err=True)
        return
    chosen = parse_backends(backends)
    report = run_bench(model_spec, chosen, provider=provider, threads=threads, images=images, new_tokens=new_tokens,
                       repeats=repeats, data=data, examples=examples, out=out, cache=cache, reference=reference,
                       plots=not no_plots, progress=lambda m: click.echo(m, err=True))
    rec = report["recommendation"]
    click.echo(f"recommended: {rec['backend'] or 'none'} ({rec['reason']}); report in {Path(out) / 'report.md'}")


# ----------------------------------------------------------------------------- serve
@main.command("serve", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None,
              help="Export folder, or a checkpoint folder / preset (exported once into a cache) "
                   "(default: the built-in model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set an API key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every /v1/* request.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False),
              help="Read the key from this file (keeps it out of the process list).")
@click.option("--served-model-name", default=None,
              help="The model id in /v1/models and requests' \"model\" (default: the --model folder's name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Requests decoded together.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a row at most; beyond, 503 with Retry-After.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Cap (and default) of a request's max_tokens.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ONNX Runtime threads (default: every core).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--allowed-local-media-path", default=None, type=click.Path(file_okay=False, exists=True),
              help="Accept file:// image URLs for files inside this folder (default: none).")
@click.option("--max-image-mb", default=16.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="An image's encoded size at most (the request body may be 4/3 of it + 1 MiB).")
@click.option("--max-image-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1),
              help="An image's width x height at most (read from its header, before decoding).")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM: seconds the requests in flight may take before they are cancelled.")
@click.option("--engine", "engine_kind", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray Serve replicas, each with its own engine (pip install 'pgexport[ray]').")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="--engine ray: replicas.")
@click.option("--address", default=None, help="--engine ray: join this Ray cluster (e.g. auto).")
def serve_command(model_spec, host, port, api_key, api_key_file, served_model_name, max_batch, max_queue,
                  max_new_tokens, threads, provider, allowed_local_media_path, max_image_mb, max_image_pixels,
                  shutdown_timeout, engine_kind, replicas, address):
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions).

    A request is one user message with a text part (the task prompt) and an image_url part
    (a data: URL); answers stream as server-sent events with stream=true, and `detect` answers
    carry pixel boxes in choices[0].message.detections. GET /health (503 while loading),
    GET /metrics (Prometheus), GET /v1/models. SIGTERM stops taking requests and lets those in
    flight finish (--shutdown-timeout). See docs/serve.md.

    \b
    Example:
      pgexport serve --model exports/pg-224 --max-batch 8 --api-key-file key.txt
      curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $(cat key.txt)" \\
          -d '{"messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,'"$(base64 -w0 cat.png)"'"}}]}]}'
      pgexport serve --model exports/pg-224 --engine ray --replicas 4 --address auto --host 0.0.0.0
    """
    from pgexport.serve.auth import read_api_key
    from pgexport.serve.config import MIB, ServeConfig
    from pgexport.serve.server import run_server

    if engine_kind != "ray" and (replicas != 1 or address):
        raise click.UsageError("--replicas and --address apply to --engine ray")
    key = read_api_key(api_key, api_key_file)
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"note: listening on {host} without --api-key: anyone who reaches this port can use the model",
                   err=True)
    config = ServeConfig(model=model_spec, model_name=served_model_name, host=host, port=port, api_key=key,
                         max_batch=max_batch, max_queue=max_queue, max_new_tokens=max_new_tokens, threads=threads,
                         provider=provider,
                         allowed_media_path=Path(allowed_local_media_path).resolve() if allowed_local_media_path else None,
                         shutdown_timeout=shutdown_timeout, max_image_bytes=int(max_image_mb * MIB),
                         max_image_pixels=max_image_pixels)
    if engine_kind == "ray":
        from pgexport.serve.ray_app import run_ray_server

        run_ray_server(config, replicas, address)
    else:
        run_server(config)


# ----------------------------------------------------------------------------- demo-web
WEB_DIR = Path(__file__).resolve().parents[1] / "examples" / "web"  # a source checkout's page
WEB_FILES = ("index.html", "app.mjs", "pgexport.mjs", "node_modules")


class _IsolatedHandler(SimpleHTTPRequestHandler):
    """Static files, with the headers that let the page's WebAssembly use threads."""

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args):  # one line per file fetched is noise here
        pass


@main.command("demo-web", cls=_OneLineUsage)
@click.option("--model", "model_spec", default=None,
              help="Export folder, checkpoint folder or preset (default: the built-in model; non-exports are "
                   "exported once into ~/.cache/pgexport).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port on 127.0.0.1 (0: any free one).")
def demo_web(model_spec, port):
    """Serve the in-browser demo on localhost: the model runs in the page (onnxruntime-web).

    Pick a sample or your own image, choose caption / question / detect, and the answer streams
    in; detected boxes are drawn on the image. Needs the page's npm packages
    (`npm ci --prefix examples/web`, in a source checkout). Ctrl-C stops the server.

    \b
    Example:
      pgexport demo-web                      # then open http://127.0.0.1:8000/
      pgexport demo-web --model exports/demo --port 8080
    """
    export_dir = resolve_export(model_spec, progress=_progress)
    if not (WEB_DIR / "node_modules" / "onnxruntime-web").is_dir():
        raise PgExportError(f"{WEB_DIR / 'node_modules'} has no onnxruntime-web; run: npm ci --prefix {WEB_DIR}")
    site = Path(tempfile.mkdtemp(prefix="pgexport-web-"))  # the page's layout, as links
    try:
        for name in WEB_FILES:
            (site / name).symlink_to(WEB_DIR / name)
        (site / "model").symlink_to(Path(export_dir).resolve())
        (site / "samples").symlink_to(DEMO_DIR / "samples")
        (site / "samples.json").write_text(json.dumps(sorted(p.name for p in (DEMO_DIR / "samples").glob("*.png"))))
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), partial(_IsolatedHandler, directory=str(site)))
        except OSError as e:
            raise PgExportError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pass a free --port") from None
        click.echo(f"serving http://127.0.0.1:{server.server_port}/ (model {export_dir}); Ctrl-C stops")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain `kill` also removes the folder
        with server:
            server.serve_forever()
    finally:
        shutil.rmtree(site)


if __name__ == "__main__":
    main()
