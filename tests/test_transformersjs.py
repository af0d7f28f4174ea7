"""`pgexport onnx --layout transformers.js`: transformers.js 4.x (Node) generates what pgexport does.

Exports of a PaliGemma 1 and a PaliGemma 2 test checkpoint (fp32 and int4 side by side) are run by
`tests/js/generate.mjs` with `@huggingface/transformers` (pinned by tests/js/package-lock.json, installed
into tests/js/node_modules on first use): its own processor, model class and greedy `generate`, on
one prompt and on a batch of two prompts of different lengths (padded). The token ids must equal
those of the Python ONNX runtime on the default export of the same checkpoint and precision, fed
the same ids and image. The transformers.js graphs are also checked against eager PyTorch with
the library's calling convention replayed in Python (right and left padding, Gemma 2 windows
shorter than the prompt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_prompts, random_pixels
from pgexport.exporters.pipeline import export_folder
from pgexport.exporters.quantize import QuantOptions, quantize_folder
from pgexport.exporters.transformersjs import SESSIONS, export_transformersjs, onnx_file
from pgexport.exporters.transformersjs_check import TransformersJsStepper, validate_transformersjs
from pgexport.models.generate import EagerStepper
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.runtime.generation import generate_tokens
from pgexport.runtime.manifest import read_manifest, write_manifest
from pgexport.runtime.session import OnnxPaliGemma

NODE = shutil.which("node")
JS_DIR = Path(__file__).parent / "js"
PROMPTS = ["caption en", "answer en what is in the image"]
NEW_TOKENS = 8

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: transformers.js runs in Node")


def _processor(cfg) -> PaliGemmaProcessor:
    return PaliGemmaProcessor.stand_in(cfg.image_token_id, cfg.vision.image_size, cfg.num_image_tokens)


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """name -> (checkpoint, transformers.js folder with fp32 + int4, default exports {fp32, int4}, image path)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ck = checkpoints(name)
            tmp = tmp_path_factory.mktemp(f"tjs-{name}")
            proc = _processor(ck.cfg)
            tjs = export_transformersjs(ck.folder, tmp / "tjs", proc, quants=("fp32", "int4"), validate=False,
                                        progress=None)["out_dir"]
            default = {"fp32": tmp / "default-fp32", "int4": tmp / "default-int4"}
            export_folder(ck.folder, default["fp32"], processor=proc, validate=False, progress=None)
            # The same int4 weights as the transformers.js export: the quantizer on a copy of the fp32
            # graphs, recorded in the manifest as `pgexport onnx --quant int4` does (the runtime then
            # keeps the prepacked weights, which the int8-activation kernels read).
            shutil.copytree(default["fp32"], default["int4"])
            info = quantize_folder(default["int4"], QuantOptions.create("int4"))
            manifest = read_manifest(default["int4"])
            manifest.quantization = {k: v for k, v in info.items() if not k.startswith("bytes_")}
            write_manifest(default["int4"], manifest)
            # An image at the model's size: both processors then skip resampling, whose filters differ.
            side = ck.cfg.vision.image_size
            pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
            image = tmp / "image.png"
            Image.fromarray(pixels).save(image)
            cache[name] = (ck, Path(tjs), default, image)
        return cache[name]

    return get


def _node_generate(folder: Path, dtype: str, image: Path, prompts: list[str]) -> dict:
    args = {"model": str(folder), "dtype": dtype, "images": [str(image)] * len(prompts), "prompts": prompts,
            "max_new_tokens": NEW_TOKENS}
    run = subprocess.run([NODE, "generate.mjs", json.dumps(args)], cwd=JS_DIR, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _until_eos(rows, eos: int) -> list[list[int]]:
    out = []
    for row in rows:
        row = [int(t) for t in row]
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@pytest.mark.parametrize("name", ["pg1", "pg2"])
@pytest.mark.parametrize("quant,dtype", [("fp32", "fp32"), ("int4", "q4")])
def test_transformersjs_generates_what_pgexport_generates(npm_packages, exported, name, quant, dtype):
    npm_packages(JS_DIR)
    ck, tjs, default, image = exported(name)
    proc = _processor(ck.cfg)
    for prompts in (PROMPTS[:1], PROMPTS):
        got = _node_generate(tjs, dtype, image, prompts)
        batch = proc(images=[Image.open(image)] * len(prompts), prompts=prompts, padding_side="left")
        # Same inputs: transformers.js's processor (tokenizer.json, preprocessor_config.json) gives our ids.
        assert got["input_ids"] == batch["input_ids"].tolist()
        assert got["attention_mask"] == batch["attention_mask"].tolist()
        assert got["pixel_values_sum"] == pytest.approx(float(batch["pixel_values"].sum()), abs=1e-2)
        with OnnxPaliGemma(default[quant]) as rt:
            want = rt.generate_ids(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], NEW_TOKENS)
        eos = ck.cfg.eos_token_id
        assert _until_eos(got["new_tokens"], eos) == _until_eos(want, eos), (prompts, got["new_tokens"], want.tolist())


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_export_validates_against_eager(exported, name):
    ck, tjs, _, _ = exported(name)
    files = {s: tjs / onnx_file(s, "fp32") for s in SESSIONS}
    report = validate_transformersjs(files, None, "float32", ck.load(), _processor(ck.cfg))
    assert report["passed"], report["failures"]
    assert report["greedy_agreement"] == 1.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_generates_each_row_alone(exported, side):
    """The transformers.js calling convention loses the padding after the first call (all-ones
    masks): the decoder's own record of it keeps a padded batch equal to eager PyTorch, here with
    Gemma 2's sliding window (16) shorter than image + prompt."""
    ck, tjs, _, _ = exported("pg2")
    ids, mask = make_prompts(ck.cfg, [7, 2], side=side)
    pixels = random_pixels(ck.cfg, 2)
    files = {s: tjs / onnx_file(s, "fp32") for s in SESSIONS}
    eos, pad = ck.cfg.eos_token_id, ck.cfg.pad_token_id
    got = generate_tokens(TransformersJsStepper(files, ck.cfg.image_token_id), ids.numpy(), mask.numpy(), pixels.numpy(),
                          12, eos, pad)
    with torch.inference_mode():
        want = generate_tokens(EagerStepper(ck.load()), ids, mask, pixels, 12, eos, pad)
    assert got.tolist() == want.tolist()


def test_folder_is_what_transformersjs_reads(exported):
    _, tjs, _, _ = exported("pg1")
    config = json.loads((tjs / "config.json").read_text())
    assert config["model_type"] == "paligemma" and config["transformers.js_config"]["dtype"] == "fp32"
    names = {p.name for p in (tjs / "onnx").iterdir()}
    for session in SESSIONS:
        for suffix in ("", "_q4"):
            assert {f"{session}{suffix}.onnx", f"{session}{suffix}.onnx_data"} <= names
            assert config["transformers.js_config"]["use_external_data_format"][f"{session}{suffix}.onnx"] == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (tjs / name).is_file()
