"""`pgexport batch` on the built-in demo model: texts equal to per-image generation (the runtime's
`generate` one image at a time, and `pgexport generate --backend onnx` for a few); the Ray engine's
rows equal the local engine's; a job killed after its first chunk and resumed writes the same file
as an uninterrupted run; unreadable, truncated and bomb images become error rows; bad
--model / --input / --out fail in one line before anything is written.

The demo model is exported once for the module (into a test cache, where `--model CHECKPOINT`
finds it); Ray is started once (`num_cpus=2`) for the one test that needs it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pgexport.batch import run_batch
from pgexport.batch.model import cache_entry, resolve_export
from pgexport.batch.schema import COLUMNS, TIMING_COLUMNS
from pgexport.batch.writer import parts_folder, read_rows
from pgexport.bundled import default_model
from pgexport.cli import main
from pgexport.processing.image import load_image
from pgexport.runtime.session import OnnxPaliGemma
from pgexport.train.dataset import random_scene, render

pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGES = 200
NEW_TOKENS = 16
PROMPTS = ["caption en", "detect circle", "answer en how many shapes are there?", "detect square ; triangle"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """The demo checkpoint exported where `pgexport batch --model CHECKPOINT` looks in `cache`."""
    from pgexport.api import export

    cache = tmp_path_factory.mktemp("cache") / "exports"  # as default_cache() under $PGEXPORT_CACHE
    entry = cache_entry(default_model(), cache)
    export(None, entry, validate=False, progress=None)  # the export itself is tested in test_onnx_export
    return entry


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """IMAGES generated shape pictures and a JSONL giving each one of PROMPTS (different lengths)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "all.jsonl", "w") as f:
        for i in range(IMAGES):
            render(random_scene(rng)).save(folder / "images" / f"{i:04d}.png")
            f.write(json.dumps({"image": f"images/{i:04d}.png", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def local_rows(export_dir, data, tmp_path_factory) -> list[dict]:
    """The uninterrupted local run over all IMAGES (JSONL output)."""
    out = tmp_path_factory.mktemp("local") / "out.jsonl"
    summary = run_batch(export_dir, data / "all.jsonl", out, prompt_column="prompt", batch_size=16,
                        max_new_tokens=NEW_TOKENS, chunk_rows=64, bar=False)
    assert summary["rows"] == summary["processed"] == IMAGES and summary["errors"] == 0
    return read_rows(out)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, (SystemExit, type(None))), result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


# ----------------------------------------------------------------------------- local engine
def test_local_rows_equal_per_image_generation(export_dir, data, local_rows):
    assert [r["id"] for r in local_rows] == [f"images/{i:04d}.png" for i in range(IMAGES)]  # input order
    assert all(set(r) == set(COLUMNS) for r in local_rows)
    model = OnnxPaliGemma(export_dir, threads=2)
    for row in local_rows:
        image = load_image(row["image"])
        alone = model.generate([image], [row["prompt"]], max_new_tokens=NEW_TOKENS)[0]
        assert row["text"] == alone, row
        assert (row["width"], row["height"]) == image.size and row["error"] is None and row["seconds"] > 0
        if row["prompt"].startswith("detect"):
            assert isinstance(row["boxes"], list)
        else:
            assert row["boxes"] is None
    boxes = [b for r in local_rows if r["boxes"] for b in r["boxes"]]
    assert boxes and all(0 <= b[k] <= 224 for b in boxes for k in ("x0", "y0", "x1", "y1"))


def test_local_rows_equal_pgexport_generate(export_dir, local_rows):
    for row in local_rows[:len(PROMPTS)]:  # one row of each prompt
        result = invoke("generate", "--backend", "onnx", "--model", export_dir, "--image", row["image"],
                        "--prompt", row["prompt"], "--max-new-tokens", NEW_TOKENS)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0] == row["text"]


def test_cli_with_checkpoint_uses_cached_export_and_parquet_bytes_input(export_dir, data, local_rows, tmp_path,
                                                                       monkeypatch):
    """--model CHECKPOINT runs the cached export; a Parquet input holding image bytes gives the same texts."""
    monkeypatch.setenv("PGEXPORT_CACHE", str(export_dir.parent.parent))
    assert resolve_export(None, export_dir.parent) == export_dir
    chosen = local_rows[:12]
    table = pa.table({"id": [r["id"] for r in chosen], "image": [Path(r["image"]).read_bytes() for r in chosen],
                      "question": [r["prompt"] for r in chosen]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    result = invoke("batch", "--model", default_model(), "--input", tmp_path / "in.parquet", "--prompt-column",
                    "question", "--out", out, "--max-new-tokens", NEW_TOKENS, "--batch-size", 5)
    assert result.exit_code == 0, result.stderr
    assert "wrote" in result.stdout and "12 rows" in result.stdout
    rows = read_rows(out)
    expect = [{**r, "image": None} for r in without_timing(chosen)]
    assert without_timing(rows) == expect
    assert not parts_folder(out).exists()


# ----------------------------------------------------------------------------- bad images
def _bomb_png(path: Path, side: int = 30000) -> None:
    """A valid PNG header for side x side pixels (Pillow refuses it as a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def mixed_input(data, local_rows, tmp_path_factory) -> Path:
    """A JSONL of 24 good rows and four bad images (truncated, not an image, empty, a bomb)."""
    folder = tmp_path_factory.mktemp("mixed")
    good = (data / "images" / "0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(b"this is not an image" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    _bomb_png(folder / "bomb.png")
    lines = [{"image": str(Path(r["image"])), "id": r["id"], "prompt": r["prompt"]} for r in local_rows[:24]]
    for i, name in enumerate(["truncated.png", "garbage.png", "empty.jpg", "bomb.png"]):
        lines.insert(3 + 5 * i, {"image": name, "prompt": PROMPTS[i]})
    (folder / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "in.jsonl"


def test_bad_images_become_error_rows(export_dir, mixed_input, local_rows, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_batch(export_dir, mixed_input, out, prompt_column="prompt", batch_size=8, max_new_tokens=NEW_TOKENS,
                        bar=False)
    assert summary["rows"] == 28 and summary["errors"] == 4
    rows = {r["id"]: r for r in read_rows(out)}
    for name, words in [("truncated.png", "truncated or corrupt"), ("garbage.png", "not an image"),
                        ("empty.jpg", "not an image"), ("bomb.png", "decompression-bomb")]:
        row = rows[name]
        assert row["text"] is None and row["boxes"] is None and words in row["error"] and name in row["error"], row
    # the good rows of the same batches are unaffected
    assert without_timing([rows[r["id"]] for r in local_rows[:24]]) == without_timing(local_rows[:24])


# ----------------------------------------------------------------------------- Ray engine
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_rows_equal_local_rows(ray_local, export_dir, mixed_input, tmp_path):
    """Two actors, Parquet output, good and bad images: the rows of the local engine."""
    local = tmp_path / "local.jsonl"
    run_batch(export_dir, mixed_input, local, prompt_column="prompt", batch_size=4, max_new_tokens=NEW_TOKENS,
              bar=False)
    out = tmp_path / "ray.parquet"
    summary = run_batch(export_dir, mixed_input, out, prompt_column="prompt", engine="ray", workers=2, batch_size=4,
                        max_new_tokens=NEW_TOKENS, chunk_rows=8, bar=False)
    assert summary["rows"] == 28 and summary["errors"] == 4
    assert pq.read_schema(out).names == list(COLUMNS)
    assert without_timing(read_rows(out)) == without_timing(read_rows(local))


# ----------------------------------------------------------------------------- resume
def test_resume_after_kill_gives_the_uninterrupted_file(export_dir, data, local_rows, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "pgexport.cli", "batch", "--model", str(export_dir), "--input", str(data / "all.jsonl"),
           "--prompt-column", "prompt", "--out", str(out), "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "8",
           "--chunk-size", "16", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = parts_folder(out)
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(parts.glob("part-*.jsonl"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    kept = [row for part in sorted(parts.glob("part-*.jsonl")) for row in read_rows(part)]
    assert not out.exists() and 16 <= len(kept) < IMAGES, "the job was not killed halfway"

    result = invoke("batch", "--model", export_dir, "--input", data / "all.jsonl", "--prompt-column", "prompt",
                    "--out", out, "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 1 and "--resume" in result.stderr  # refuses to start over silently
    summary = run_batch(export_dir, data / "all.jsonl", out, prompt_column="prompt", batch_size=16,
                        max_new_tokens=NEW_TOKENS, resume=True, bar=False)
    assert summary["skipped"] == len(kept) and summary["processed"] == IMAGES - len(kept)
    assert without_timing(read_rows(out)) == without_timing(local_rows)
    assert not parts.exists()
    again = run_batch(export_dir, data / "all.jsonl", out, prompt_column="prompt", resume=True, bar=False)
    assert again["processed"] == 0 and without_timing(read_rows(out)) == without_timing(local_rows)


# ----------------------------------------------------------------------------- bad arguments
def test_bad_model_input_out_fail_in_one_line_before_writing(export_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    base = ["--max-new-tokens", 4]
    cases = [
        (["--model", tmp_path / "nope", "--input", data / "images", "--out", out], "nope not found"),
        (["--model", data / "images", "--input", data / "images", "--out", out], "neither pgexport.json"),
        # A mistyped preset: one line, and no "exporting it once" before it.
        (["--model", "paligema-3b-pt-224", "--input", data / "images", "--out", out], "nor a preset"),
        (["--model", export_dir, "--input", tmp_path / "missing", "--out", out], "not found"),
        (["--model", export_dir, "--input", str(tmp_path / "*.png"), "--out", out], "no file matches"),
        (["--model", export_dir, "--input", data / "images", "--out", tmp_path / "out.csv"], ".parquet or .jsonl"),
        (["--model", export_dir, "--input", data / "images", "--out", tmp_path / "no" / "out.jsonl"], "does not exist"),
        (["--model", export_dir, "--input", data / "images", "--out", out, "--prompt-column", "p"], "--prompt-column"),
        (["--model", export_dir, "--input", data / "all.jsonl", "--out", out, "--prompt-column", "question"],
         "'question'"),
    ]
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png"}\n{not json\n')
    cases.append((["--model", export_dir, "--input", tmp_path / "broken.jsonl", "--out", out], "broken.jsonl:2"))
    for args, part in cases:
        assert_one_line_error(invoke("batch", *args, *base), part)
        assert list(tmp_path.glob("out*")) == [] and not parts_folder(out).exists(), args
    out.write_text("")
    assert_one_line_error(invoke("batch", "--model", export_dir, "--input", data / "images", "--out", out, *base),
                          "--resume")
