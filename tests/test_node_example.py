"""examples/node: the export run from Node (onnxruntime-node + @huggingface/tokenizers) gives the
Python runtime's tokens and text; its image preprocessing gives pgexport's pixels.

Needs `node` and `npm`: examples/node's npm packages are installed from its lock file on first use;
skipped where node or npm is missing or the npm registry is unreachable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgexport.bundled import DEMO_DIR
from pgexport.processing.detection import parse_detections
from pgexport.processing.image import preprocess_images
from pgexport.runtime import OnnxPaliGemma

NODE_DIR = Path(__file__).resolve().parents[1] / "examples" / "node"
SAMPLES = sorted((DEMO_DIR / "samples").glob("*.png"))
PROMPTS = ["caption en", "answer en how many shapes are there?", "detect circle", "detect triangle"]
MAX_NEW_TOKENS = 24

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module", autouse=True)
def _packages(npm_packages):
    npm_packages(NODE_DIR)


def run_node(export_dir: Path, image: Path, prompt: str) -> dict:
    out = subprocess.run(["node", "paligemma.mjs", str(export_dir), str(image), prompt, "--json",
                          "--max-new-tokens", str(MAX_NEW_TOKENS)],
                         cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_node_generates_what_the_python_runtime_does(demo_export):
    with OnnxPaliGemma(demo_export) as model:
        for i, prompt in enumerate(PROMPTS):
            image = SAMPLES[i % len(SAMPLES)]
            batch = model.processor(images=[Image.open(image)], prompts=[prompt])
            ids = model.generate_ids(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], MAX_NEW_TOKENS)
            text = model.generate([Image.open(image)], [prompt], MAX_NEW_TOKENS)[0]
            got = run_node(demo_export, image, prompt)
            assert got["ids"] == ids[0].tolist(), (image.name, prompt)
            assert got["text"] == text, (image.name, prompt)
            expected = parse_detections(text, *Image.open(image).size)
            assert [d["label"] for d in got["detections"]] == [d.label for d in expected]
            np.testing.assert_allclose([d["box"] for d in got["detections"]], [d.box for d in expected] or np.zeros((0,)))


def test_node_runs_the_prefill_decode_pair(demo_export, tmp_path):
    """A folder without decoder.onnx (written before it existed) runs prefill.onnx + decode.onnx."""
    manifest = json.loads((demo_export / "pgexport.json").read_text())
    del manifest["graphs"]["decoder"]
    for f in demo_export.iterdir():
        if f.name != "pgexport.json" and not f.name.startswith("decoder.onnx"):
            os.symlink(f, tmp_path / f.name)
    os.symlink(demo_export / "decoder.onnx.data", tmp_path / "decoder.onnx.data")  # prefill/decode's weights
    (tmp_path / "pgexport.json").write_text(json.dumps(manifest))
    with OnnxPaliGemma(demo_export) as model:
        text = model.generate([Image.open(SAMPLES[0])], ["caption en"], MAX_NEW_TOKENS)[0]
    assert run_node(tmp_path, SAMPLES[0], "caption en")["text"] == text


def test_node_preprocessing_gives_pgexports_pixels(demo_export, tmp_path):
    """The JS Pillow-style resize and PNG reader: the same float32 pixels, bit for bit, for images
    of every PNG colour type, taller / wider / smaller than the model's input, with transparency."""
    rng = np.random.default_rng(0)
    images = {
        "rgb-wide.png": Image.fromarray(rng.integers(0, 256, (97, 150, 3), np.uint8)),
        "rgb-tall.png": Image.fromarray(rng.integers(0, 256, (300, 41, 3), np.uint8)),  # vertical pass first
        "rgba.png": Image.fromarray(rng.integers(0, 256, (130, 140, 4), np.uint8)),
        "grey-small.png": Image.fromarray(rng.integers(0, 256, (50, 60), np.uint8)),
        "palette.png": Image.fromarray(rng.integers(0, 256, (200, 200, 3), np.uint8)).convert("P", colors=16),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    files = [str(tmp_path / name) for name in images] + [str(p) for p in SAMPLES]
    script = ("import { readFileSync } from 'node:fs'; import { preprocess } from '../web/pgexport.mjs';"
              "import { decodePng } from './png.mjs';"
              "const [manifest, ...files] = process.argv.slice(1);"
              "const m = JSON.parse(readFileSync(manifest, 'utf8'));"
              "for (const f of files) process.stdout.write(preprocess(decodePng(readFileSync(f)), m));")
    out = subprocess.run(["node", "--input-type=module", "-e", script, str(demo_export / "pgexport.json"), *files],
                         cwd=NODE_DIR, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    size = json.loads((demo_export / "pgexport.json").read_text())["image_size"]
    got = np.frombuffer(out.stdout, np.float32).reshape(len(files), 3, size, size)
    for f, pixels in zip(files, got):
        np.testing.assert_array_equal(pixels, preprocess_images([f], size)[0], err_msg=f)
