"""The export folder contract and the ONNX Runtime runtime (`pgexport.runtime.session.OnnxPaliGemma`).

Tiny PaliGemma 1 and 2 models with random weights (std 0.2, non-trivial norms, so greedy
decoding wanders over the vocabulary) are exported once per module with `export_folder`
(validation included); a medium-size model (hidden 512, MLP 4096, 4 layers, vocab 32768) is
exported once for the memory measurement. Subprocesses prove the runtime, the `generate --backend
onnx` command and `examples/onnx_app.py` run where importing torch fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

import pgexport  # noqa: E402
from pgexport.bundled import SAMPLE_IMAGE, sample_image  # noqa: E402
from pgexport.errors import PgExportError  # noqa: E402
from pgexport.exporters import pipeline  # noqa: E402
from pgexport.exporters.pipeline import export_folder  # noqa: E402
from pgexport.runtime.manifest import MANIFEST_FILE, read_manifest  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.eager.generate import generate as eager_generate_ids  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["caption en", "answer en what colour is the circle in the middle?"]
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONIOENCODING": "utf-8"}


# ----------------------------------------------------------------------------- fixtures
def random_model(cfg: PaliGemmaConfig, seed: int = 0) -> PaliGemma:
    """Random weights loud enough for greedy decoding to vary (as in test_onnx_export)."""
    model = PaliGemma.random(cfg, seed=seed, std=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5, generator=g)
            if "post_" in name:  # a random Gemma 2 otherwise repeats its last token
                p += 4.0
    return model


def _export(preset: str, tmp_path_factory):
    model = random_model(PaliGemmaConfig.from_preset(preset))
    out = tmp_path_factory.mktemp("export") / preset
    result = export_folder(model, out, progress=None, threads=1, max_new_tokens=12)
    return model, pgexport.load_processor(preset), out, result


@pytest.fixture(scope="module")
def export_pg1(tmp_path_factory):
    return _export("paligemma-tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def export_pg2(tmp_path_factory):
    return _export("paligemma2-tiny", tmp_path_factory)


@pytest.fixture(params=["pg1", "pg2"])
def exported(request):
    return request.getfixturevalue(f"export_{request.param}")


@pytest.fixture(scope="module")
def runtime_pg1(export_pg1):
    return OnnxPaliGemma(export_pg1[2], threads=1)


def noise_image(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def images():
    return [sample_image(), noise_image(0)]


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg, msg
    return msg


def torch_blocker(tmp_path: Path, *also: str) -> dict:
    """Environment whose interpreters cannot import torch (nor the modules in `also`)."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    blocked = ["torch", *also]
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked))
    path = os.pathsep.join([str(folder), ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**ENV, "PYTHONPATH": path}


def run(args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], env=env or ENV, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


# ----------------------------------------------------------------------------- the folder
def test_folder_contents_and_manifest(exported):
    model, processor, out, result = exported
    cfg = model.cfg
    names = {p.name for p in out.iterdir()}
    assert {"pgexport.json", "vision_encoder.onnx", "prefill.onnx", "decode.onnx", "vision_encoder.onnx.data",
            "decoder.onnx.data", "tokenizer.json", "preprocessor_config.json", "export_report.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    raw = json.loads((out / MANIFEST_FILE).read_text())
    for key in ("format_version", "graphs", "num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                "num_image_tokens", "image_size", "image_mean", "image_std", "image_token_id", "bos_token_id",
                "eos_token_id", "pad_token_id", "dtype", "quantization", "tokenizer", "opset"):
        assert key in raw, key
    m = read_manifest(out)
    assert m.graphs == {"vision_encoder": "vision_encoder.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx",
                        "decoder": "decoder.onnx"}
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.hidden_size, m.vocab_size) == (
        cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim, cfg.text.hidden_size,
        cfg.text.vocab_size)
    assert (m.num_image_tokens, m.image_size, m.image_token_id) == (cfg.num_image_tokens, cfg.vision.image_size,
                                                                   cfg.image_token_id)
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (2, 1, 0)
    assert m.dtype == "float32" and m.quantization == "none" and m.tokenizer == "tokenizer.json"
    assert m.image_mean == m.image_std == [0.5, 0.5, 0.5]
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": m.image_size, "width": m.image_size}
    assert pre["image_seq_length"] == m.num_image_tokens
    # the folder's tokenizer is the model's
    rt_proc = OnnxPaliGemma(out, threads=1).processor
    assert rt_proc.tokenizer.to_str() == processor.tokenizer.to_str()


def test_export_report(exported, record_diff):
    _, _, out, result = exported
    report = json.loads((out / "export_report.json").read_text())
    assert report == result["report"]
    assert report["passed"], report["failures"]
    assert report["sample"]["batch"] == 2 and len(set(report["sample"]["prompt_tokens"])) == 2  # padded
    assert report["greedy_agreement"] == 1.0 and report["greedy_match_prefix"] == report["greedy_tokens"] == 12
    assert report["logits_max_abs_diff"] < 1e-4 and report["vision_max_abs_diff"] < 1e-4
    assert len(report["decode_logits_max_abs_diff"]) == 4
    record_diff("report logits", report["logits_max_abs_diff"])


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("padding", ["left", "right"])
def test_generate_matches_eager(exported, padding):
    """OnnxPaliGemma.generate == pgexport.generate (eager) for 20 tokens, padded batch of 2."""
    model, processor, out, _ = exported
    rt = OnnxPaliGemma(out, threads=1)
    if padding == "left":  # the public text API (left padding, as the processor does by default)
        expected = pgexport.generate(model, processor, images(), PROMPTS, max_new_tokens=20)
        assert rt.generate(images(), PROMPTS, max_new_tokens=20) == expected
    batch = processor(images=images(), prompts=PROMPTS, padding_side=padding)
    assert (batch["attention_mask"] == 0).any()
    ref = eager_generate_ids(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 20)
    got = rt.generate_ids(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 20)
    assert got.tolist() == ref.tolist()
    assert ref.shape[1] >= 10 and len(set(ref.reshape(-1).tolist())) > 2  # the model does not just stop or repeat


def test_generate_single_prompt_and_sampling(runtime_pg1, export_pg1):
    model, processor, _, _ = export_pg1
    image = sample_image()
    assert runtime_pg1.generate([image], ["detect circle"], max_new_tokens=8) == \
        pgexport.generate(model, processor, [image], ["detect circle"], max_new_tokens=8)
    sampling = pgexport.Sampling(do_sample=True, temperature=0.9, top_p=0.95, seed=3)
    assert runtime_pg1.generate(image, ["caption en", "ocr"], max_new_tokens=8, sampling=sampling) == \
        pgexport.generate(model, processor, [image], ["caption en", "ocr"], max_new_tokens=8, sampling=sampling)


def test_step_api(runtime_pg1, export_pg1):
    """encode_image -> prefill -> decode by hand equals generate; numpy past works too."""
    rt = runtime_pg1
    batch = rt.processor(images=images(), prompts=PROMPTS)
    m = rt.manifest
    features = rt.encode_image(batch["pixel_values"])
    assert features.shape == (2, m.num_image_tokens, m.hidden_size) and features.dtype == np.float32
    logits, past = rt.prefill(batch["input_ids"], features, batch["attention_mask"])
    S = batch["input_ids"].shape[1]
    assert logits.shape == (2, m.vocab_size) and len(past) == 2 * m.num_layers
    assert past[0].shape() == [2, m.num_kv_heads, S, m.head_dim]
    mask, tokens = batch["attention_mask"], []
    for step in range(5):
        token = logits.argmax(-1)
        tokens.append(token)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        if step % 2:  # the cache as numpy arrays is accepted too
            past = [p.numpy() for p in past]
        logits, past = rt.decode(token[:, None], mask, past)
        assert past[0].shape() == [2, m.num_kv_heads, S + step + 1, m.head_dim]
    expected = rt.generate_ids(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 5)
    assert np.stack(tokens, 1).tolist() == expected.tolist()
    with pytest.raises(PgExportError, match="pixel_values has shape"):
        rt.encode_image(np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(PgExportError, match="past has 1 tensors"):
        rt.decode(np.zeros((2, 1), np.int64), mask, past[:1])


def test_stepper_writes_one_cache_in_place(runtime_pg1):
    """generate's stepper allocates the cache once (prompt + max_new_tokens slots) and every step
    writes its slot into that memory; it gives the two-session runtime's logits, and asking for
    more steps than the cache holds is a one-line error."""
    rt = runtime_pg1
    assert rt.single_decoder
    batch = rt.processor(images=images(), prompts=PROMPTS)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    S, new = ids.shape[1], 4
    split = OnnxPaliGemma(rt.export_dir, threads=1, single_decoder=False)
    ours, theirs = rt.stepper(), split.stepper()
    np.testing.assert_allclose(ours.prefill(ids, mask, pix, new), theirs.prefill(ids, mask, pix, new), rtol=0, atol=1e-4)
    pointers = [c.data_ptr() for c in ours.cache]
    assert ours.cache[0].shape() == [2, rt.manifest.num_kv_heads, S + new, rt.manifest.head_dim]
    for step in range(new):
        token = np.array([5 + step, 9 + step])
        np.testing.assert_allclose(ours.decode(token), theirs.decode(token), rtol=0, atol=1e-4)
        assert [c.data_ptr() for c in ours.cache] == pointers
        written = ours.cache[0].numpy()[:, :, :S + step + 1]
        np.testing.assert_allclose(written, theirs.past[0].numpy(), rtol=0, atol=1e-5)
    with pytest.raises(PgExportError, match="KV cache holds"):
        ours.decode(np.array([1, 1]))


def test_folder_with_an_earlier_decoder_runs_prefill_and_decode(export_pg1, runtime_pg1, tmp_path):
    """A decoder.onnx without `cache_position` (the form before the cache was written in place) is
    not opened: the folder runs its prefill/decode pair, or says to re-export when asked for it."""
    _, _, out, _ = export_pg1
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "pgexport.json").read_text())
    manifest["graphs"]["decoder"] = "decode.onnx"  # a decoder graph without cache_position
    (old / "pgexport.json").write_text(json.dumps(manifest))
    rt = OnnxPaliGemma(old, threads=1)
    assert not rt.single_decoder
    assert rt.generate(images(), PROMPTS, max_new_tokens=6) == runtime_pg1.generate(images(), PROMPTS, max_new_tokens=6)
    with pytest.raises(PgExportError, match="re-export"):
        OnnxPaliGemma(old, threads=1, single_decoder=True)


@pytest.mark.parametrize("share", [False, "initializers"])
def test_other_weight_sharing_modes_give_the_same_tokens(export_pg1, runtime_pg1, share):
    """share_weights=False (ORT loads and prepacks) and "initializers" (the CUDA mechanism:
    one OrtValue per weight given to both sessions, run here on the CPU)."""
    _, _, out, _ = export_pg1
    assert runtime_pg1.share_mode == "buffers"
    other = OnnxPaliGemma(out, threads=1, share_weights=share)
    assert other.share_mode == (share or None)
    assert other.generate(images(), PROMPTS, max_new_tokens=10) == runtime_pg1.generate(images(), PROMPTS, max_new_tokens=10)
    with pytest.raises(PgExportError, match="share_weights"):
        OnnxPaliGemma(out, share_weights="sometimes")


def test_threads_give_the_serial_outputs(export_pg2):
    _, _, out, _ = export_pg2
    rt = OnnxPaliGemma(out, threads=1)
    noise = [noise_image(10 + i, (64 + 8 * i, 64)) for i in range(4)]
    jobs = [([noise[i], sample_image()], [PROMPTS[i % 2], f"answer en how many shapes are there {i}?"]) for i in range(4)]
    serial = [rt.generate(imgs, prompts, max_new_tokens=12) for imgs, prompts in jobs]
    barrier = threading.Barrier(4)

    def job(i):
        barrier.wait()  # start together
        return [rt.generate(*jobs[i], max_new_tokens=12) for _ in range(2)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(4)))
    for i in range(4):
        assert results[i] == [serial[i], serial[i]]
    assert len({tuple(s) for s in serial}) > 1  # the jobs really differ


# ----------------------------------------------------------------------------- a moved or damaged folder
def test_moved_folder_still_runs(export_pg1, runtime_pg1, tmp_path):
    _, _, out, _ = export_pg1
    first = tmp_path / "first"
    shutil.copytree(out, first)
    moved = tmp_path / "elsewhere" / "deeper" / "moved"
    moved.parent.mkdir(parents=True)
    shutil.move(str(first), str(moved))
    assert not first.exists()
    rt = OnnxPaliGemma(moved, threads=1)
    assert rt.generate(images(), PROMPTS, max_new_tokens=8) == runtime_pg1.generate(images(), PROMPTS, max_new_tokens=8)


def _set_location(graph: Path, location: str) -> None:
    proto = onnx.load(str(graph), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(graph))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_escaping_the_folder_is_refused(export_pg1, tmp_path, how):
    _, _, out, _ = export_pg1
    folder = tmp_path / "inner" / "export"
    shutil.copytree(out, folder)
    outside = tmp_path / "inner" / "x"
    shutil.copy(folder / "decoder.onnx.data", outside)  # the bytes are there: only the path is wrong
    location = {"dotdot": "../x", "absolute": str(outside), "symlink": "link.data"}[how]
    if how == "symlink":
        os.symlink(outside, folder / "link.data")
    _set_location(folder / "prefill.onnx", location)
    with pytest.raises(PgExportError) as e:
        OnnxPaliGemma(folder)
    msg = one_line(e.value)
    assert "prefill.onnx" in msg and repr(location) in msg and "refusing" in msg
    with pytest.raises(PgExportError, match="refusing"):  # inspect refuses it as well
        from pgexport.runtime.onnx_files import describe_export

        describe_export(folder)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not protobuf\xff" * 100)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, file, must_contain", [
    (_garbage, "decode.onnx", "decode.onnx"),
    (_truncate, "prefill.onnx", "prefill.onnx"),
    (Path.unlink, "vision_encoder.onnx", "vision_encoder.onnx"),
    (_truncate, "decoder.onnx.data", "decoder.onnx.data"),
    (Path.unlink, "decoder.onnx.data", "decoder.onnx.data"),
    (Path.unlink, "tokenizer.json", "tokenizer.json"),
    (Path.unlink, "pgexport.json", "pgexport.json"),
    (lambda p: p.write_text('{"format_version": 1, "graphs": '), "pgexport.json", "corrupt"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": 99})), "pgexport.json",
     "format_version 99"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "num_layers": 3})), "pgexport.json",
     "not the prefill graph"),
])
def test_damaged_folder_gives_one_line_error(export_pg1, tmp_path, damage, file, must_contain):
    _, _, out, _ = export_pg1
    folder = tmp_path / "damaged"
    shutil.copytree(out, folder)
    damage(folder / file)
    with pytest.raises(PgExportError) as e:
        OnnxPaliGemma(folder)
    assert must_contain in one_line(e.value)


def test_bad_arguments(export_pg1, tmp_path):
    _, _, out, _ = export_pg1
    with pytest.raises(PgExportError, match="not found"):
        OnnxPaliGemma(tmp_path / "nope")
    with pytest.raises(PgExportError, match="unknown provider"):
        OnnxPaliGemma(out, provider="tpu")
    if not CUDA:
        with pytest.raises(PgExportError, match="CUDAExecutionProvider"):
            OnnxPaliGemma(out, provider="cuda")
    rt = OnnxPaliGemma(out, threads=1)
    with pytest.raises(PgExportError, match="context"):
        rt.generate([sample_image()], ["caption en"], max_new_tokens=10_000)


# ----------------------------------------------------------------------------- without torch
def test_runtime_and_cli_work_without_torch(export_pg1, runtime_pg1, tmp_path):
    _, _, out, _ = export_pg1
    env = torch_blocker(tmp_path)
    script = (
        "import sys\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch was importable')\n"
        "from pgexport.runtime.session import OnnxPaliGemma\n"
        "from pgexport.bundled import sample_image\n"
        f"rt = OnnxPaliGemma({str(out)!r}, threads=1)\n"
        "print(repr(rt.generate([sample_image()], ['caption en', 'detect circle'], max_new_tokens=10)))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m] is not None]\n"
    )
    p = run(["-c", script], env=env)
    assert p.returncode == 0, p.stderr
    expected = runtime_pg1.generate([sample_image()], ["caption en", "detect circle"], max_new_tokens=10)
    assert p.stdout == repr(expected) + "\n"

    p = run(["-m", "pgexport.cli", "generate", "--backend", "onnx", "--model", out, "--prompt", "caption en",
             "--max-new-tokens", "10"], env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout == runtime_pg1.generate([sample_image()], ["caption en"], max_new_tokens=10)[0] + "\n"


def test_example_app_prints_what_the_runtime_generates(export_pg2, tmp_path):
    """examples/onnx_app.py needs only onnxruntime, numpy, tokenizers and pillow (pgexport blocked)."""
    _, _, out, _ = export_pg2
    env = torch_blocker(tmp_path, "pgexport", "onnx")
    for prompt in ("caption en", "answer en what colour is the circle?"):
        p = run([REPO / "examples" / "onnx_app.py", out, SAMPLE_IMAGE, prompt, "--max-new-tokens", "12"], env=env)
        assert p.returncode == 0, p.stderr
        expected = OnnxPaliGemma(out, threads=1).generate([sample_image()], [prompt], max_new_tokens=12)[0]
        assert p.stdout == expected + "\n"


# ----------------------------------------------------------------------------- memory
RSS_SCRIPT = r"""
import json, os, sys
import numpy, onnx, onnxruntime, tokenizers, PIL.Image  # the libraries, imported before the baseline
from pgexport.runtime.session import OnnxPaliGemma
from pgexport.bundled import sample_image

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

folder, share = sys.argv[1], {"1": True, "0": False}.get(sys.argv[2], sys.argv[2])
single = sys.argv[3] == "single"
image = sample_image()
base = rss()
rt = OnnxPaliGemma(folder, threads=1, share_weights=share, single_decoder=single)
loaded = rss()
rt.generate([image, image], ["caption en", "answer en what is in the image?"], max_new_tokens=8)  # touches every weight
print(json.dumps({"base": base, "loaded": loaded, "after": rss()}))
"""


@pytest.fixture(scope="module")
def medium_export(tmp_path_factory):
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny").replace(text=dict(
        hidden_size=512, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1,
        head_dim=64, vocab_size=32768))
    out = tmp_path_factory.mktemp("medium") / "medium"
    export_folder(PaliGemma.random(cfg, seed=0), out, validate=False, progress=None)
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_loaded_export_holds_one_copy_of_the_weights(medium_export, tmp_path, record_diff):
    """RSS growth of loading + running an fp32 export <= 1.25x its weight bytes, with the single
    decoder session (the default) whatever `share_weights` says, and with the two-session
    runtime when it shares the weights.

    Measured in a fresh interpreter, from a baseline taken after importing the libraries, to
    after a generate call (which reads every weight)."""
    weight_bytes = sum(p.stat().st_size for p in medium_export.iterdir() if p.name.endswith(".data"))
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    ratios = {}
    for decoder in ("single", "split"):
        for share in ("1", "0", "initializers"):
            p = run([script, medium_export, share, decoder])
            assert p.returncode == 0, p.stderr
            r = json.loads(p.stdout)
            ratios[decoder, share] = (r["after"] - r["base"]) / weight_bytes
            record_diff(f"rss growth/weights {decoder} share={share}", ratios[decoder, share])
    print(f"\nweights {weight_bytes / 2**20:.1f} MiB; RSS growth / weights: "
          + ", ".join(f"{d} share={s} {v:.3f}" for (d, s), v in ratios.items()))
    assert ratios["single", "1"] <= 1.25  # prepacked once, the mapped file pages dropped
    assert ratios["single", "initializers"] <= 1.25
    assert ratios["single", "0"] <= 1.75  # ONNX Runtime's own copy, then prepacked
    assert ratios["split", "1"] <= 1.25  # shared, not prepacked (slower GEMMs)
    assert ratios["split", "initializers"] <= 1.25
    assert ratios["split", "0"] > 2  # a copy per session, and prepacking: what the single decoder avoids


# ----------------------------------------------------------------------------- CLI
def test_cli_onnx_inspect_generate(tmp_path):
    """`pgexport onnx`, `pgexport inspect`, `pgexport generate --backend onnx`: one real run each."""
    ckpt = pgexport.init_checkpoint("paligemma2-tiny", tmp_path / "ckpt", seed=1, progress=lambda _m: None)
    out = tmp_path / "exports" / "pg2"
    p = run(["-m", "pgexport.cli", "onnx", "--model", ckpt, "--out", out])
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # progress goes to a terminal only
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (") and lines[1].startswith("validation passed")
    assert read_manifest(out).model_type == "paligemma2"
    assert read_manifest(out).source["model"] == "ckpt"  # no absolute path of the exporting machine
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()

    env = torch_blocker(tmp_path)  # neither inspect nor generate --backend onnx needs torch
    p = run(["-m", "pgexport.cli", "inspect", out], env=env)
    assert p.returncode == 0, p.stderr
    for text in ("vision_encoder: vision_encoder.onnx", "prefill: prefill.onnx", "decode: decode.onnx",
                 "decoder.onnx.data", "quantization none", "dtype float32",
                 "input  pixel_values", "output image_features", "[batch, 3, 56, 56]",
                 "past_key_values.{0..1}.key|value", "[batch, 2, past_sequence_length, 16]",
                 "present.{0..1}.key|value", "[batch, 2, past_sequence_length + 1, 16]", "output logits"):
        assert text in p.stdout, (text, p.stdout)

    p = run(["-m", "pgexport.cli", "generate", "--backend", "onnx", "--model", out, "--max-new-tokens", "6"], env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    model, processor = pgexport.load_model(ckpt), pgexport.load_processor(ckpt)
    expected = pgexport.generate(model, processor, [sample_image()], ["caption en"], max_new_tokens=6)[0]
    assert p.stdout == expected + "\n"


def test_cli_errors():
    from click.testing import CliRunner

    from pgexport.cli import main

    def invoke(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        return r.exit_code, r.output

    code, output = invoke("generate", "--backend", "onnx", "--max-new-tokens", "2")
    assert code == 1 and "--backend onnx needs --model EXPORT_DIR" in output
    code, output = invoke("inspect", "/no/such/export")
    assert code == 1 and "not found" in output and output.count("\n") == 1
    code, output = invoke("onnx", "--out", "x", "--quant", "int3")
    assert code == 2 and "int3" in output


# ----------------------------------------------------------------------------- export_folder
def test_fp16_export_runs(tmp_path):
    model = random_model(PaliGemmaConfig.from_preset("paligemma-tiny"))
    out = tmp_path / "fp16"
    result = export_folder(model, out, quant="fp16", progress=None, threads=1, max_new_tokens=8)
    assert read_manifest(out).dtype == "float16"
    assert result["report"]["passed"], result["report"]["failures"]
    rt = OnnxPaliGemma(out, threads=1)
    texts = rt.generate(images(), PROMPTS, max_new_tokens=8)
    assert len(texts) == 2
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    data = sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(".data"))
    assert data < 0.6 * fp32_bytes


def copying_export_onnx(export_dir: Path):
    """A stand-in for export_onnx that copies the graphs of an existing export (fast)."""
    def export_onnx(model, folder, **kwargs):
        shutil.copytree(export_dir, folder, ignore=lambda d, names: [n for n in names if not n.endswith(
            (".onnx", ".onnx.data", "config.json")) or n == "preprocessor_config.json"])
        return {"opset": kwargs.get("opset", 20)}

    return export_onnx


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, export_pg1):
    """An exception or Ctrl-C part way (after the graphs are written) leaves no out_dir, no
    temporary folder, and an existing folder being replaced untouched."""
    model = export_pg1[0]

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_onnx", copying_export_onnx(export_pg1[2]))
    monkeypatch.setattr(pipeline, "write_preprocessor_config", boom)
    out = tmp_path / "exports" / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        export_folder(model, out, progress=None, validate=False)
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []

    # replacing an existing export: the old one survives an --overwrite interrupted inside
    # export_onnx (simulated: a half-written graph, then Ctrl-C)
    old = tmp_path / "exports" / "old"
    shutil.copytree(export_pg1[2], old)
    before = sorted((p.name, p.stat().st_size) for p in old.iterdir())

    def half_written(model, folder, **kwargs):
        Path(folder).mkdir()
        (Path(folder) / "vision_encoder.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_onnx", half_written)
    with pytest.raises(KeyboardInterrupt):
        export_folder(model, old, progress=None, validate=False, overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in old.iterdir()) == before
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["old"]

    monkeypatch.undo()
    with pytest.raises(PgExportError, match="not empty"):
        export_folder(model, old, progress=None, validate=False)


def test_failed_validation_keeps_the_folder_and_says_so(tmp_path, monkeypatch, export_pg1):
    from pgexport.exporters import validate

    monkeypatch.setitem(validate.TOLERANCE, "float32", -1.0)  # nothing can pass
    monkeypatch.setattr(pipeline, "export_onnx", copying_export_onnx(export_pg1[2]))
    out = tmp_path / "strict"
    with pytest.raises(pipeline.ExportValidationError) as e:
        export_folder(export_pg1[0], out, progress=None, threads=1, max_new_tokens=4)
    msg = one_line(e.value)
    assert "validation failed" in msg and "export_report.json" in msg
    report = json.loads((out / "export_report.json").read_text())
    assert not report["passed"] and report["failures"]
    OnnxPaliGemma(out, threads=1)  # the folder itself is complete


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a GPU machine)")
def test_cuda_matches_cpu_and_keeps_the_cache_on_the_device(export_pg1, runtime_pg1):
    _, _, out, _ = export_pg1
    rt = OnnxPaliGemma(out, provider="cuda")
    assert rt.providers[0] == "CUDAExecutionProvider"
    assert rt.generate(images(), PROMPTS, max_new_tokens=12) == runtime_pg1.generate(images(), PROMPTS, max_new_tokens=12)
    batch = rt.processor(images=images(), prompts=PROMPTS)
    features = rt.encode_image(batch["pixel_values"], keep_on_device=True)
    assert features.device_name().lower() == "cuda"
    logits, past = rt.prefill(batch["input_ids"], features, batch["attention_mask"])
    assert isinstance(logits, np.ndarray) and all(p.device_name().lower() == "cuda" for p in past)
    mask = np.concatenate([batch["attention_mask"], np.ones((2, 1), np.int64)], axis=1)
    logits2, present = rt.decode(logits.argmax(-1)[:, None], mask, past)
    assert all(p.device_name().lower() == "cuda" for p in present)
    cpu_features = runtime_pg1.encode_image(batch["pixel_values"])
    cpu_logits, cpu_past = runtime_pg1.prefill(batch["input_ids"], cpu_features, batch["attention_mask"])
    cpu_logits2, _ = runtime_pg1.decode(logits.argmax(-1)[:, None], mask, cpu_past)
    np.testing.assert_allclose(logits, cpu_logits, rtol=0, atol=1e-3)
    np.testing.assert_allclose(logits2, cpu_logits2, rtol=0, atol=1e-3)
