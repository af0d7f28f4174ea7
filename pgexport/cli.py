"""The `pgexport` command line.

Every command turns bad input into one line on stderr and exit code 1 (2 for usage errors);
`pgexport --debug COMMAND` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import PgExportError


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
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


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
    from .models.config import PRESETS

    if preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}", param_hint="--preset")
    from .api import init_checkpoint

    init_checkpoint(preset, out, seed=seed, dtype=dtype, progress=_progress)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--model", "model_spec", default=None, help="Checkpoint folder or preset (default: the built-in model).")
@click.option("--image", "image_path", default=None, type=click.Path(dir_okay=False), help="Input image (default: a bundled sample).")
@click.option("--prompt", default="caption en", show_default=True, help='Task prefix, e.g. "caption en", "detect circle".')
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-k", default=None, type=click.IntRange(min=1), help="Sample from the k most likely tokens.")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling.")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--draw", default=None, type=click.Path(dir_okay=False), help="For detect prompts: save the image with boxes here.")
def generate(model_spec, image_path, prompt, max_new_tokens, backend, device, dtype, temperature, top_k, top_p, seed, draw):
    """Generate text for one image and prompt; prints boxes for `detect` prompts.

    \b
    Example:
      pgexport generate --model paligemma-3b-pt-224 --image cat.jpg --prompt "detect cat" --draw out.png
    """
    from .api import SAMPLE_IMAGE, load_model, load_processor
    from .api import generate as run_generate
    from .detection import draw_detections, parse_detections
    from .generation import Sampling
    from .image import load_image

    if draw:
        _check_writable_image(draw)  # before the slow part, not after it
    image = load_image(image_path or SAMPLE_IMAGE)
    sampling = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) if temperature > 0 else None
    model = load_model(model_spec, dtype=dtype, device=device)
    processor = load_processor(model_spec)
    text = run_generate(model, processor, [image], [prompt], max_new_tokens=max_new_tokens, sampling=sampling)[0]
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


def _check_writable_image(path: str) -> None:
    """--draw must name an image format Pillow can write, in an existing folder."""
    from PIL import Image

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


if __name__ == "__main__":
    main()
