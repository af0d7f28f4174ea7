"""The `pgexport` command line, driven as a user drives it.

End-to-end tests run the real command in a fresh interpreter (`python -m pgexport.cli ...`, or
the installed `pgexport` script) and look at its exit code, stdout and stderr. Error cases that
need a loaded model run in-process with click's CliRunner (no second torch import per case);
any exception that escapes the CLI there is appended to stderr as a traceback, so the "one line,
no traceback" checks hold the same way in both.

The contract under test (README, "Command line"): bad input ends with exactly one line on
stderr, starting with "error:", naming the file, key or limit, and exit code 1 (2 for click's
usage errors); `pgexport --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pgexport
from pgexport.bundled import SAMPLE_IMAGE
from pgexport.cli import main
from pgexport.processing.image import load_image

PRESET = "paligemma2-tiny"
SEED = 1
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"]
LOC = re.compile(r"((?:<loc\d{4}>){4})(?:<seg\d{3}>)*([^;<]*)")  # as documented in detection.py


# ----------------------------------------------------------------------------- running the CLI
@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_cli(*args, cwd=None, script: bool = False, timeout: float = 300) -> Run:
    """The real command line in a fresh interpreter."""
    cmd = [shutil.which("pgexport")] if script else [sys.executable, "-m", "pgexport.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                       encoding="utf-8", errors="replace", timeout=timeout)
    return Run(p.returncode, p.stdout, p.stderr)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by default


def invoke(*args) -> Run:
    """The CLI in-process. An exception that escapes it becomes a traceback on stderr."""
    result = _runner().invoke(main, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return Run(result.exit_code, result.stdout, stderr)


def assert_error(run: Run, *must_contain: str, code: int = 1) -> str:
    """Exit `code`, exactly one stderr line "error: ..." containing each of `must_contain`."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert run.code == code, (run.code, run.stderr)
    assert run.stderr.endswith("\n") and run.stderr.count("\n") == 1, f"not one line:\n{run.stderr}"
    line = run.stderr.rstrip("\n")
    assert line.startswith("error: "), line
    for part in must_contain:
        assert str(part) in line, f"{part!r} not in {line!r}"
    return line


def assert_usage_error(run: Run, *must_contain: str) -> None:
    """click's usage errors: exit 2, usage + "Error: ..." on stderr, no traceback."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert run.code == 2, (run.code, run.stderr)
    assert "Error:" in run.stderr
    for part in must_contain:
        assert str(part) in run.stderr, f"{part!r} not in {run.stderr!r}"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def init_run(workdir) -> Run:
    """`pgexport init` of the checkpoint the other tests use, run as a user would (relative --out)."""
    return run_cli("init", "--preset", PRESET, "--out", "tiny2", "--seed", SEED, cwd=workdir)


@pytest.fixture(scope="module")
def ckpt(workdir, init_run) -> Path:
    assert init_run.code == 0, init_run.stderr
    return workdir / "tiny2"


@pytest.fixture(scope="module")
def model_and_processor(ckpt):
    return pgexport.load_model(ckpt), pgexport.load_processor(ckpt)


@pytest.fixture
def broken(ckpt, tmp_path):
    """`broken(edit)`: a copy of the checkpoint folder with `edit(folder)` applied."""

    def make(edit) -> Path:
        folder = tmp_path / "broken"
        shutil.copytree(ckpt, folder)
        edit(folder)
        return folder

    return make


@pytest.fixture(scope="module")
def bad_images(workdir) -> dict[str, Path]:
    folder = workdir / "images"
    folder.mkdir()
    out = {}
    out["text"] = folder / "notes.png"
    out["text"].write_text("these are my notes, not a picture\n")
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        full = folder / f"full.{ext}"
        Image.effect_noise((96, 64), 60).convert("RGB").save(full, fmt)
        data = full.read_bytes()
        out[f"cut-{ext}"] = folder / f"cut.{ext}"
        out[f"cut-{ext}"].write_bytes(data[: len(data) // 2])
    # 12000 x 12000 = 144 M pixels, above Pillow's MAX_IMAGE_PIXELS (89 M) but below twice it,
    # where Pillow only warns; blank greyscale compresses to ~140 kB.
    out["bomb"] = folder / "huge.png"
    Image.new("L", (12000, 12000)).save(out["bomb"])
    return out


def generate_args(model, *extra, image=SAMPLE_IMAGE, prompt="caption en", max_new_tokens=2):
    return ["generate", "--model", model, "--image", image, "--prompt", prompt,
            "--max-new-tokens", max_new_tokens, *extra]


# ----------------------------------------------------------------------------- init
def test_init_writes_a_hugging_face_folder(init_run, ckpt):
    assert init_run.stderr == ""
    assert init_run.stdout == "wrote tiny2\n"
    for name in CHECKPOINT_FILES:
        assert (ckpt / name).is_file(), name
    assert not [p.name for p in ckpt.parent.iterdir() if ".tmp" in p.name]  # temp folder gone
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "paligemma" and config["text_config"]["model_type"] == "gemma2"
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    side = config["vision_config"]["image_size"]
    assert pre["size"] == {"height": side, "width": side}


def test_init_tokenizer_ids_match_config(ckpt):
    from tokenizers import Tokenizer

    config = json.loads((ckpt / "config.json").read_text())
    image_id = config["image_token_index"]
    loc0 = image_id - 1024 - 128  # PaliGemma appends 1024 loc, 128 seg, then <image>
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.token_to_id("<image>") == image_id
    assert tok.token_to_id("<pad>") == config["pad_token_id"] == 0
    assert tok.token_to_id("<eos>") == config["eos_token_id"] == 1
    assert tok.token_to_id("<bos>") == config["bos_token_id"] == 2
    assert [tok.token_to_id(f"<loc{i:04d}>") for i in range(1024)] == list(range(loc0, loc0 + 1024))
    assert [tok.token_to_id(f"<seg{i:03d}>") for i in range(128)] == list(range(loc0 + 1024, loc0 + 1152))
    assert tok.get_vocab_size() <= config["text_config"]["vocab_size"] == config["vocab_size"]
    # loc/seg tokens survive decoding (they are the detection/segmentation output); <image> does not.
    ids = [image_id, loc0 + 7, loc0 + 1024 + 3]
    assert tok.decode(ids, skip_special_tokens=True) == "<loc0007><seg003>"

    import transformers  # the folder's tokenizer as transformers reads it gives the same ids

    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    names = ["<image>", "<pad>", "<eos>", "<bos>", "<loc0000>", "<loc1023>", "<seg000>", "<seg127>"]
    assert hf_tok.convert_tokens_to_ids(names) == [tok.token_to_id(t) for t in names]


def test_init_folder_loads_in_pgexport_and_transformers_with_same_logits(ckpt, model_and_processor):
    from conftest import assert_same_parameters, load_hf_model

    ours, processor = model_and_processor
    hf = load_hf_model(ckpt)
    assert_same_parameters(ours, hf)
    images = [load_image(SAMPLE_IMAGE), Image.effect_noise((80, 50), 40).convert("RGB")]
    batch = processor(images=images, prompts=["caption en", "detect circle ; square"], return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the two prompts differ in length: left padding is exercised
    with torch.no_grad():
        logits = ours(**batch)
        ref = hf(**batch, position_ids=mask.cumsum(-1)).logits  # 1-based positions of real tokens
    assert logits.shape == ref.shape
    assert (logits - ref).abs()[mask.bool()].max().item() <= 1e-4


def test_init_same_seed_same_weights_other_seed_other_weights(ckpt, tmp_path):
    from safetensors.torch import load_file

    assert invoke("init", "--preset", PRESET, "--out", tmp_path / "again", "--seed", SEED).code == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "again" / name).read_text() == (ckpt / name).read_text(), name

    assert invoke("init", "--preset", PRESET, "--out", tmp_path / "other", "--seed", SEED + 1).code == 0
    a, b = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "other" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert any("embed_tokens" in k for k in differing) and any("patch_embedding" in k for k in differing)


def test_init_into_non_empty_folder_fails_cleanly(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_error(invoke("init", "--preset", PRESET, "--out", out), str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left


def test_init_into_empty_existing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert invoke("init", "--preset", "paligemma-tiny", "--out", tmp_path / "empty").code == 0
    assert set(CHECKPOINT_FILES) <= {p.name for p in (tmp_path / "empty").iterdir()}


def test_init_bad_preset_and_dtype(tmp_path):
    assert_usage_error(invoke("init", "--preset", "paligemma-huge", "--out", tmp_path / "x"), "paligemma-huge", "--preset")
    assert_error(invoke("init", "--preset", PRESET, "--out", tmp_path / "y", "--dtype", "float64"), "float64", "float32")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


# ----------------------------------------------------------------------------- generate
def test_generate_prints_what_the_python_api_generates(ckpt, model_and_processor):
    run = run_cli(*generate_args("tiny2", max_new_tokens=5), cwd=ckpt.parent)
    assert run.code == 0 and run.stderr == "", run.stderr
    model, processor = model_and_processor
    expected = pgexport.generate(model, processor, [load_image(SAMPLE_IMAGE)], ["caption en"], max_new_tokens=5)[0]
    assert expected.strip()  # the random model does produce some text
    assert run.stdout == expected + "\n"  # and nothing else: no box lines for a caption prompt


def test_generate_sampling_is_reproducible_across_processes(ckpt, model_and_processor):
    args = generate_args(ckpt, "--temperature", "0.8", "--seed", "3", max_new_tokens=6)
    first, second = run_cli(*args), run_cli(*args)
    assert first.code == second.code == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    model, processor = model_and_processor
    sampling = pgexport.Sampling(do_sample=True, temperature=0.8, seed=3)
    expected = pgexport.generate(model, processor, [load_image(SAMPLE_IMAGE)], ["caption en"],
                                 max_new_tokens=6, sampling=sampling)[0]
    assert first.stdout == expected + "\n"


def _expected_box_lines(text: str, width: int, height: int) -> list[str]:
    """Box lines computed here from the documented rule (ymin, xmin, ymax, xmax; v / 1023)."""
    lines = []
    for locs, label in LOC.findall(text):
        ymin, xmin, ymax, xmax = (int(v) / 1023 for v in re.findall(r"\d{4}", locs))
        lines.append(f"{label.strip() or '(no label)'}: x0={xmin * width:.0f} y0={ymin * height:.0f} "
                     f"x1={xmax * width:.0f} y1={ymax * height:.0f}")
    return lines


def test_generate_detect_prints_boxes_and_draws(ckpt, model_and_processor, tmp_path):
    """A real detect run: find a prompt for which the random model emits four loc tokens."""
    model, processor = model_and_processor
    image = load_image(SAMPLE_IMAGE)
    for obj in ("cat", "triangle", "diamond", "circle", "square", "star", "dog", "shapes"):
        prompt = f"detect {obj}"
        text = pgexport.generate(model, processor, [image], [prompt], max_new_tokens=8)[0]
        if LOC.search(text):
            break
    else:
        pytest.skip("this random model emits no <loc>x4 for any candidate detect prompt "
                    "(formatting is still covered by test_generate_detect_output_format)")
    out_png = tmp_path / "boxes.png"
    run = run_cli(*generate_args(ckpt, "--draw", out_png, prompt=prompt, max_new_tokens=8))
    assert run.code == 0 and run.stderr == "", run.stderr
    boxes = _expected_box_lines(text, image.width, image.height)
    assert boxes
    assert run.stdout.splitlines() == [text, *boxes, f"wrote {out_png}"]
    with Image.open(out_png) as drawn:
        assert drawn.size == image.size
        assert drawn.convert("RGB").tobytes() != image.convert("RGB").tobytes()  # a box was drawn


def test_generate_detect_output_format(ckpt, monkeypatch, tmp_path):
    """The CLI's printing path on a known two-object answer (generation replaced, nothing else)."""
    text = "<loc0000><loc0000><loc0511><loc1023> cat ; <loc0512><loc0000><loc1023><loc1023> dog"
    monkeypatch.setattr(pgexport.api, "generate", lambda *a, **k: [text])
    image = load_image(SAMPLE_IMAGE)
    w, h = image.size
    run = invoke(*generate_args(ckpt, "--draw", tmp_path / "out.jpg", prompt="detect cat ; dog"))
    assert run.code == 0, run.stderr
    assert run.stdout.splitlines() == [
        text,
        f"cat: x0=0 y0=0 x1={w} y1={511 / 1023 * h:.0f}",
        f"dog: x0=0 y0={512 / 1023 * h:.0f} x1={w} y1={h}",
        f"wrote {tmp_path / 'out.jpg'}",
    ]
    assert (tmp_path / "out.jpg").is_file()
    # Not a detect prompt: the same text is printed as is, with no box lines.
    run = invoke(*generate_args(ckpt, prompt="caption en"))
    assert run.code == 0 and run.stdout == text + "\n"


def test_generate_default_model_and_image():
    run = invoke("generate", "--max-new-tokens", "2")  # built-in model, bundled sample image
    assert run.code == 0 and run.stderr == "", run.stderr
    assert run.stdout.endswith("\n")


# ----------------------------------------------------------------------------- help
def test_every_command_help_shows_an_example():
    for command in [[], *[[name] for name in main.commands]]:
        run = invoke(*command, "--help")
        assert run.code == 0, command
        assert "Example" in run.stdout and "pgexport " in run.stdout, command


def test_help_from_the_installed_script():
    if shutil.which("pgexport") is None:
        pytest.skip("the pgexport console script is not on PATH")
    for command in ([], ["init"], ["generate"]):
        run = run_cli(*command, "--help", script=True)
        assert run.code == 0 and "Example" in run.stdout, (command, run.stderr)


# ----------------------------------------------------------------------------- bad input
def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_error(run_cli(*generate_args(missing)), str(missing), "not found")
    assert_error(invoke(*generate_args("no-such-preset")), "no-such-preset", PRESET)


def test_model_path_is_a_file(ckpt):
    assert_error(invoke(*generate_args(ckpt / "config.json")), str(ckpt / "config.json"), "not a checkpoint folder")


def test_missing_config_json(broken):
    folder = broken(lambda f: (f / "config.json").unlink())
    assert_error(invoke(*generate_args(folder)), str(folder / "config.json"), "not found")


def test_corrupt_config_json(broken):
    folder = broken(lambda f: (f / "config.json").write_text('{"model_type": "paligemma", '))
    assert_error(invoke(*generate_args(folder)), str(folder / "config.json"))


def test_corrupt_safetensors(broken):
    folder = broken(lambda f: (f / "model.safetensors").write_bytes(b"garbage!" * 512))
    assert_error(run_cli(*generate_args(folder)), str(folder / "model.safetensors"), "corrupt")


def test_truncated_safetensors(broken):
    def cut(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    folder = broken(cut)
    assert_error(invoke(*generate_args(folder)), str(folder / "model.safetensors"), "truncated")


def test_no_weights_at_all(broken):
    folder = broken(lambda f: (f / "model.safetensors").unlink())
    assert_error(invoke(*generate_args(folder)), str(folder), "model.safetensors")


def test_config_that_does_not_match_the_weights(broken):
    def narrower(folder):
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["hidden_size"] = 32
        (folder / "config.json").write_text(json.dumps(config))

    folder = broken(narrower)
    line = assert_error(invoke(*generate_args(folder)), str(folder), "config.json")
    # names a key and both shapes: the checkpoint's (64 wide) and the config's (32 wide)
    assert re.search(r"language_model\.\S+weight: checkpoint \[[\d, ]*64[\d, ]*\] vs config \[[\d, ]*32[\d, ]*\]", line), line


def test_folder_without_tokenizer(broken):
    folder = broken(lambda f: (f / "tokenizer.json").unlink())
    assert_error(invoke(*generate_args(folder)), str(folder), "tokenizer")


@pytest.mark.parametrize("kind, must_contain", [
    ("text", "not an image"),
    ("cut-png", "truncated"),
    ("cut-jpg", "truncated"),
    ("bomb", "144000000 pixels"),
])
def test_bad_image(ckpt, bad_images, kind, must_contain):
    # Images are read before torch is imported: these subprocesses are cheap.
    path = bad_images[kind]
    line = assert_error(run_cli(*generate_args(ckpt, image=path)), str(path), must_contain)
    if kind == "bomb":
        assert f"MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}" in line


def test_missing_image(ckpt, tmp_path):
    assert_error(invoke(*generate_args(ckpt, image=tmp_path / "nope.png")), str(tmp_path / "nope.png"), "not found")


def test_image_over_twice_the_bomb_limit(ckpt, tmp_path, monkeypatch):
    # Above 2 x MAX_IMAGE_PIXELS Pillow raises instead of warning: same one-line error.
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert_error(invoke(*generate_args(ckpt, image=path)), str(path), "60000 pixels", "MAX_IMAGE_PIXELS=10000")


def test_prompt_longer_than_the_context(ckpt, model_and_processor):
    _, processor = model_and_processor
    prompt = "red circle " * 400
    n_tokens = processor(images=[load_image(SAMPLE_IMAGE)], prompts=[prompt])["input_ids"].shape[1]
    context = json.loads((ckpt / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert n_tokens > context
    assert_error(invoke(*generate_args(ckpt, prompt=prompt, max_new_tokens=2)), f"{n_tokens} tokens", str(context - 2))


def test_more_new_tokens_than_the_context(ckpt):
    assert_error(invoke(*generate_args(ckpt, max_new_tokens=1000)), "1000", "512")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_gpu(ckpt):
    assert_error(invoke(*generate_args(ckpt, "--device", "cuda")), "cuda", "--device cpu")


def test_unknown_device(ckpt):
    assert_error(invoke(*generate_args(ckpt, "--device", "tpu")), "'tpu'")


def test_invalid_dtype(ckpt):
    assert_error(invoke(*generate_args(ckpt, "--dtype", "float64")), "float64", "float32", "bfloat16")


def test_draw_into_missing_folder_or_unknown_format(ckpt, tmp_path):
    target = tmp_path / "no-dir" / "out.png"
    assert_error(invoke(*generate_args(ckpt, "--draw", target, prompt="detect cat")), str(target), "does not exist")
    assert_usage_error(invoke(*generate_args(ckpt, "--draw", tmp_path / "out.xyz", prompt="detect cat")), "--draw", ".xyz")


def test_usage_errors_exit_2(ckpt):
    assert_usage_error(invoke(*generate_args(ckpt, max_new_tokens=0)), "--max-new-tokens")
    assert_usage_error(invoke("generate", "--no-such-option"), "--no-such-option")


def test_debug_shows_the_traceback(ckpt, bad_images):
    path = bad_images["text"]
    plain = run_cli(*generate_args(ckpt, image=path))
    assert_error(plain, str(path))
    debug = run_cli("--debug", *generate_args(ckpt, image=path))
    assert debug.code == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("pgexport.errors.PgExportError:")
    assert str(path) in debug.stderr.rstrip().splitlines()[-1]
