"""The optimum-quanto PyTorch backend (`pgexport quantize`, `pgexport.eager.quanto`).

A checkpoint with 256-wide layers (so int4 uses 128-input groups, not one group per channel) is
quantized, saved (safetensors + quantization_map.json, no pickle), reloaded on the meta device
and must generate exactly what the in-memory quantized model generates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
quanto = pytest.importorskip("optimum.quanto")

import pgexport  # noqa: E402
from pgexport.errors import PgExportError  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.models.checkpoint import save_checkpoint  # noqa: E402
from pgexport.models.config import TextConfig, VisionConfig, tiny_vocab_size  # noqa: E402
from pgexport.models.generate import EagerStepper  # noqa: E402
from pgexport.eager.generate import generate as generate_ids  # noqa: E402
from pgexport.eager.quanto import (  # noqa: E402
    QMAP_FILE,
    WEIGHTS_FILE,
    describe_quantized,
    load_quantized,
    quantize_checkpoint,
    quantize_model,
)

PROMPTS = ["caption en", "answer en what colour is the circle?"]


def config() -> PaliGemmaConfig:
    vocab, image_id = tiny_vocab_size(512)
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                          image_size=56, patch_size=14)
    text = TextConfig(model_type="gemma2", vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      query_pre_attn_scalar=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=image_id)


def random_model(seed: int = 0) -> PaliGemma:
    """Weights loud enough for greedy decoding to vary (a random Gemma 2 otherwise repeats one token)."""
    from conftest import loud_weights_

    return loud_weights_(PaliGemma.random(config(), seed=seed, std=0.08), seed, norm_std=0.5, post_norm_shift=4.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float checkpoint folder (HF layout with tokenizer and preprocessor config)."""
    from pgexport.processing.image import write_preprocessor_config
    from pgexport.processing.tokenizer import build_paligemma_tokenizer, save_tokenizer

    folder = tmp_path_factory.mktemp("quanto") / "ckpt"
    folder.mkdir()
    model = random_model()
    save_checkpoint(model, folder)
    save_tokenizer(build_paligemma_tokenizer(512), folder)
    write_preprocessor_config(folder, model.cfg.vision.image_size, model.cfg.num_image_tokens)
    return folder


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("quanto") / request.param
    quantize_checkpoint(str(checkpoint), out, quant=request.param)
    return request.param, out


def batch(processor):
    images = [pgexport.sample_image(), pgexport.sample_image().rotate(90)]
    return processor(images=images, prompts=PROMPTS)


def test_folder_contents(quantized, checkpoint):
    quant, out = quantized
    names = {p.name for p in out.iterdir()}
    assert {WEIGHTS_FILE, QMAP_FILE, "config.json", "tokenizer.json", "preprocessor_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    qmap = json.loads((out / QMAP_FILE).read_text())
    qtype = {"int8": "qint8", "int4": "qint4"}[quant]
    cfg = config()
    linear = cfg.vision.num_hidden_layers * 6 + 1 + cfg.text.num_hidden_layers * 7
    assert len(qmap) == linear and all(v == {"weights": qtype, "activations": "none"} for v in qmap.values())
    assert not [k for k in qmap if "embed" in k]  # the embedding (and the tied head) stay float

    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["pgexport_quant"] == quant
        data = f.get_tensor("language_model.layers.0.mlp.gate_proj.weight._data"
                            + ("._data" if quant == "int4" else ""))  # int4: a packed tensor inside
    assert "language_model.embed_tokens.weight" in keys
    assert "language_model.layers.0.mlp.gate_proj.weight" not in keys
    assert data.dtype == (torch.int8 if quant == "int8" else torch.uint8)
    if quant == "int4":  # 256 inputs: groups of 128 (two per output row), not one per channel
        assert "language_model.layers.0.mlp.gate_proj.weight._shift" in keys
        with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
            assert f.get_tensor("language_model.layers.0.mlp.gate_proj.weight._scale").numel() == 512 * 2


def test_round_trip_matches_in_memory_model(quantized, checkpoint):
    """save -> reload (meta device, requantized) generates exactly what the in-memory model does."""
    quant, out = quantized
    in_memory = quantize_model(pgexport.load_model(str(checkpoint)), quant)
    reloaded = pgexport.load_model(str(out))  # routed to load_quantized
    processor = pgexport.load_processor(str(out))
    b = batch(processor)
    with torch.no_grad():
        a = EagerStepper(in_memory).prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], 4)
        r = EagerStepper(reloaded).prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], 4)
    np.testing.assert_array_equal(a, r)
    ids_a = generate_ids(in_memory, b["input_ids"], b["attention_mask"], b["pixel_values"], 16)
    ids_r = generate_ids(reloaded, b["input_ids"], b["attention_mask"], b["pixel_values"], 16)
    assert ids_a.tolist() == ids_r.tolist()
    assert len(set(ids_a.reshape(-1).tolist())) > 2  # not a degenerate output
    assert pgexport.generate(reloaded, processor, [pgexport.sample_image()], ["caption en"], max_new_tokens=8) == \
        pgexport.generate(in_memory, processor, [pgexport.sample_image()], ["caption en"], max_new_tokens=8)
    # and it is close to the float model (int8 closer than int4)
    fp32 = pgexport.load_model(str(checkpoint))
    f = EagerStepper(fp32).prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], 4)
    rel = np.abs(r - f).max() / np.abs(f).max()
    assert rel < {"int8": 0.05, "int4": 0.5}[quant], rel


def test_reload_builds_no_float_linear_weights(quantized):
    quant, out = quantized
    model = load_quantized(out)
    info = describe_quantized(model)
    assert info["quantized_modules"] == len(json.loads((out / QMAP_FILE).read_text()))
    assert info["qtypes"] == [{"int8": "qint8", "int4": "qint4"}[quant]]
    for name, module in model.named_modules():
        if isinstance(module, quanto.QModuleMixin):
            assert isinstance(module.weight, quanto.QTensor), name  # never a float tensor
    assert not [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    # the float parameters left are the embedding, the patch embedding, norms and biases
    float_params = {n for n, p in model.named_parameters() if not isinstance(p.data, quanto.QTensor)}
    assert all(n.endswith(("bias", "norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight"))
               or "embed" in n or "layernorm" in n or "norm" in n for n in float_params), float_params


def test_bad_quantized_folders(quantized, tmp_path):
    import shutil

    _, out = quantized
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    qmap = json.loads((broken / QMAP_FILE).read_text())
    qmap.pop(next(iter(qmap)))
    (broken / QMAP_FILE).write_text(json.dumps(qmap))  # a module the weights say is quantized is not
    with pytest.raises(PgExportError) as e:
        load_quantized(broken)
    assert "\n" not in str(e.value) and "re-run pgexport quantize" in str(e.value)
    (broken / QMAP_FILE).write_text("{not json")
    with pytest.raises(PgExportError, match="corrupt"):
        load_quantized(broken)
    with pytest.raises(PgExportError, match="float32 only"):
        pgexport.load_model(str(out), dtype="bfloat16")


def test_cli_quantize_and_generate(checkpoint, tmp_path):
    from click.testing import CliRunner

    from pgexport.cli import main

    out = tmp_path / "q4"
    r = CliRunner().invoke(main, ["quantize", "--model", str(checkpoint), "--quant", "int4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "--model", str(out), "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    model = quantize_model(pgexport.load_model(str(checkpoint)), "int4")
    expected = pgexport.generate(model, pgexport.load_processor(str(checkpoint)), [pgexport.sample_image()],
                                 ["caption en"], max_new_tokens=6)[0]
    assert r.output == expected + "\n"
    # an existing folder is refused; quanto weights cannot be exported to ONNX
    r = CliRunner().invoke(main, ["quantize", "--model", str(checkpoint), "--quant", "int8", "--out", str(out)])
    assert r.exit_code == 1 and "not empty" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["onnx", "--model", str(out), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "cannot be traced to ONNX" in r.output and r.output.count("\n") == 1
