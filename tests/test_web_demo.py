"""`pgexport demo-web`: the demo page runs the model in headless Chromium (onnxruntime-web) and
shows the Python runtime's answers, with the detected boxes drawn on the image.

Needs `node`, `npm` and Debian's `chromium` (.ci/run installs it); examples/web's npm packages are
installed from its lock file on first use. The tests that need them skip where node or npm is
missing or the npm registry is unreachable; the browser test also where chromium is missing.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgexport.bundled import DEMO_DIR
from pgexport.processing.detection import parse_detections
from pgexport.runtime import OnnxPaliGemma

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "examples" / "web"
DRIVER = ROOT / "tests" / "web_demo_driver.mjs"
SAMPLES = sorted((DEMO_DIR / "samples").glob("*.png"))
MAX_NEW_TOKENS = 32  # the page's
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]  # the page's
CHROMIUM = shutil.which("chromium")


def demo_web(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pgexport.cli", "demo-web", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def canvas_pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(int)


@pytest.mark.skipif(shutil.which("node") is None or CHROMIUM is None, reason="needs node and chromium (apt-get install chromium)")
def test_page_answers_like_the_python_runtime_and_draws_boxes(npm_packages, demo_export, tmp_path):
    npm_packages(WEB_DIR)
    # The Python runtime's answers: a caption, and a detection on a sample where it finds something.
    with OnnxPaliGemma(demo_export) as model:
        answers = {(s.name, p): model.generate([Image.open(s)], [p], MAX_NEW_TOKENS)[0]
                   for s in SAMPLES for p in ("caption en", "detect circle")}
    sample = next((s.name for s in SAMPLES if parse_detections(answers[s.name, "detect circle"], 1, 1)), None)
    assert sample, "the demo model detects no circle in any sample"
    runs = [{"sample": sample, "task": "caption"}, {"sample": sample, "task": "detect", "text": "circle"}]

    server = demo_web("--model", str(demo_export), "--port", "0")
    try:
        url = server.stdout.readline().split()[1]  # "serving http://127.0.0.1:PORT/ ..."
        out = subprocess.run(["node", str(DRIVER), url, CHROMIUM, json.dumps(runs), str(tmp_path / "page.png")],
                             capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout)
    assert page["errors"] == []
    caption, detect = page["results"]
    assert (caption["state"], caption["prompt"], caption["answer"]) == ("done", "caption en", answers[sample, "caption en"])
    assert (detect["state"], detect["prompt"], detect["answer"]) == ("done", "detect circle", answers[sample, "detect circle"])

    # Boxes drawn: the caption run shows the bare image, the detection run the same image with
    # each box outlined in its label's colour.
    bare, boxed = canvas_pixels(caption["canvas"]), canvas_pixels(detect["canvas"])
    height, width = boxed.shape[:2]
    detections = parse_detections(detect["answer"], width, height)
    assert detect["boxes"] == len(detections) > 0
    colours = {}
    for det in detections:
        colour = np.array(Image.new("RGB", (1, 1), colours.setdefault(det.label, PALETTE[len(colours) % len(PALETTE)])).getpixel((0, 0)))
        x0, y0, x1, y1 = (int(round(v)) for v in det.box)
        x0, x1 = max(x0, 0), min(x1, width - 1)
        y0, y1 = max(y0, 0), min(y1, height - 1)
        edges = [boxed[max(y - 2, 0):y + 3, x] for y in (y0, y1) for x in range(x0 + 4, x1 - 3)]  # top, bottom
        edges += [boxed[y, max(x - 2, 0):x + 3] for x in (x0, x1) for y in range(y0 + 24, y1 - 3)]  # left, right (below the label)
        hit = [np.abs(strip - colour).sum(-1).min() < 40 for strip in edges]
        assert np.mean(hit) > 0.9, f"box {det} not outlined in {colour}"
    assert (np.abs(boxed - bare).sum(-1) > 0).any()


def test_demo_web_reports_a_bad_model_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    server = demo_web("--model", str(tmp_path), "--port", "0")
    _, err = server.communicate(timeout=120)
    assert server.returncode == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "pgexport.json" in err


def test_demo_web_reports_a_busy_port_in_one_line(npm_packages, demo_export):
    npm_packages(WEB_DIR)  # demo-web checks for them before it listens
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = demo_web("--model", str(demo_export), "--port", str(busy.getsockname()[1]))
        _, err = server.communicate(timeout=120)
    assert server.returncode == 1
    assert err.count("\n") == 1 and err.startswith("error: cannot listen on 127.0.0.1:") and "--port" in err
