"""Checkpoint loading and saving: every naming in the wild, shards, dtypes, and bad input.

Reference checkpoints are written by transformers' `save_pretrained` (5.x naming) from tiny
random models (conftest.py); the other namings are produced from it by renaming keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (
    assert_same_parameters,
    copy_config,
    edit_config,
    load_hf_model,
    make_prompts,
    random_pixels,
    save_hf_checkpoint,
)
from pgexport.errors import PgExportError
from pgexport.models.checkpoint import load_checkpoint, save_checkpoint, to_published_name

VARIANTS = ["pg1", "pg2"]


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, config_from: Path) -> Path:
    """A one-file checkpoint folder with `tensors` and the config.json of `config_from`."""
    copy_config(config_from, folder)
    # safetensors refuses tensors that share memory (the tied head): give each its own copy.
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load_error(folder: Path, **kwargs) -> str:
    """The message of the `PgExportError` that loading `folder` raises (a single line)."""
    with pytest.raises(PgExportError) as info:
        load_checkpoint(folder, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg == msg.strip() and msg
    return msg


# ----------------------------------------------------------------------------- namings
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_5x_naming_loads_bitwise(checkpoints, variant):
    ck = checkpoints(variant)
    keys = set(saved_tensors(ck.folder))
    # What save_pretrained of transformers 5.x writes (the naming this test is about).
    assert "vision_tower.embeddings.patch_embedding.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys
    assert "multi_modal_projector.linear.weight" in keys
    assert not any(k.startswith(("model.", "vision_tower.vision_model.")) for k in keys)
    ours = ck.load()
    assert ours.cfg == ck.cfg  # the config.json transformers wrote reads back to our config
    assert_same_parameters(ours, ck.hf)


def to_legacy_key(key: str) -> str:
    """transformers 5.x file naming -> the published checkpoints' naming."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key  # language_model.model.*, multi_modal_projector.* are already legacy


@pytest.mark.parametrize("tied_head_copy", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_published_legacy_naming_loads_bitwise(checkpoints, tmp_path, variant, tied_head_copy):
    ck = checkpoints(variant)
    tensors = {to_legacy_key(k): v for k, v in saved_tensors(ck.folder).items()}
    if tied_head_copy:  # transformers 4.x wrote the tied head out as well
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in tensors
    ours = load_checkpoint(write_safetensors(tensors, tmp_path / "legacy", ck.folder))
    assert_same_parameters(ours, ck.hf)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_in_memory_naming_loads_bitwise(checkpoints, tmp_path, variant):
    ck = checkpoints(variant)
    tensors = ck.hf.state_dict()  # model.vision_tower.*, model.language_model.*, lm_head.weight
    assert "lm_head.weight" in tensors and "model.vision_tower.post_layernorm.weight" in tensors
    ours = load_checkpoint(write_safetensors(tensors, tmp_path / "in-memory", ck.folder))
    assert_same_parameters(ours, ck.hf)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sharded_transformers_checkpoint_loads_bitwise(checkpoints, tmp_path, variant):
    ck = checkpoints(variant)
    folder = save_hf_checkpoint(ck.hf, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert_same_parameters(load_checkpoint(folder), ck.hf)


# ----------------------------------------------------------------------------- our writer
@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_checkpoint_round_trip(checkpoints, tmp_path, variant, max_shard_bytes):
    ck = checkpoints(variant)
    ours = ck.load()
    folder = tmp_path / "ours"
    save_checkpoint(ours, folder, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
        assert set(index["weight_map"]) == {to_published_name(k) for k in ours.state_dict()}
        assert not (folder / "model.safetensors").exists()
    else:
        # The published naming, no tied head copy.
        assert set(saved_tensors(folder)) == {to_published_name(k) for k in ours.state_dict()}
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*"))  # no leftovers
    again = load_checkpoint(folder)
    assert again.cfg == ours.cfg
    assert_same_parameters(again, ck.hf)


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_what_we_save(checkpoints, tmp_path, variant, max_shard_bytes):
    ck = checkpoints(variant)
    ours = ck.load()
    save_checkpoint(ours, tmp_path / "ours", max_shard_bytes=max_shard_bytes)
    hf = load_hf_model(tmp_path / "ours")
    assert_same_parameters(ours, hf)
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    ids, mask = make_prompts(ck.cfg, [4, 1])
    pixels = random_pixels(ck.cfg, 2)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                 token_type_ids=torch.zeros_like(ids), position_ids=mask.cumsum(-1)).logits
        ref_orig = ck.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                         token_type_ids=torch.zeros_like(ids), position_ids=mask.cumsum(-1)).logits
        out = ours(ids, pixels, mask)
    assert torch.equal(ref, ref_orig)  # same weights, same config -> same reference logits
    assert (out - ref).abs()[mask.bool()].max().item() <= 1e-4


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_casts_to_dtype(checkpoints, variant, dtype):
    ck = checkpoints(variant)
    fp32 = ck.load().state_dict()
    low = ck.load(dtype=dtype)
    for k, v in low.state_dict().items():
        assert v.dtype == dtype, k
        assert torch.equal(v, fp32[k].to(dtype)), k
    assert low.dtype == dtype
    # And it runs.
    ids, mask = make_prompts(ck.cfg, [3])
    with torch.no_grad():
        logits = low(ids, random_pixels(ck.cfg, 1).to(dtype), mask)
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


def test_bf16_checkpoint_loads_into_fp32(checkpoints, tmp_path):
    ck = checkpoints("pg2")
    tensors = {k: v.to(torch.bfloat16) for k, v in saved_tensors(ck.folder).items()}
    ours = load_checkpoint(write_safetensors(tensors, tmp_path / "bf16", ck.folder))
    for k, v in ours.state_dict().items():
        assert v.dtype == torch.float32
    hf_sd = {k: v for k, v in ck.hf.state_dict().items()}
    assert torch.equal(ours.language_model.norm.weight, hf_sd["model.language_model.norm.weight"].bfloat16().float())


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def good(checkpoints, tmp_path) -> Path:
    """A private copy of a valid transformers 5.x checkpoint folder, free to damage."""
    return copy_checkpoint(checkpoints("pg2").folder, tmp_path / "ckpt")


def test_missing_config_json(good):
    os.remove(good / "config.json")
    msg = load_error(good)
    assert str(good / "config.json") in msg


def test_invalid_config_json(good):
    (good / "config.json").write_text("{ not json")
    msg = load_error(good)
    assert str(good / "config.json") in msg


def test_missing_weights(good):
    os.remove(good / "model.safetensors")
    msg = load_error(good)
    assert str(good) in msg and "model.safetensors" in msg


def test_pickle_only_folder_is_refused(good):
    os.remove(good / "model.safetensors")
    (good / "pytorch_model.bin").write_bytes(b"not loaded")
    msg = load_error(good)
    assert "pytorch_model.bin" in msg


def test_garbage_safetensors_file(good):
    size = (good / "model.safetensors").stat().st_size
    g = torch.Generator().manual_seed(0)
    garbage = torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).numpy().tobytes()
    (good / "model.safetensors").write_bytes(garbage)
    msg = load_error(good)
    assert str(good / "model.safetensors") in msg


def test_garbage_header_that_looks_valid(good):
    # A plausible header length followed by text that is not JSON.
    (good / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{this is not js}" + b"\0" * 64)
    msg = load_error(good)
    assert str(good / "model.safetensors") in msg


def test_empty_safetensors_file(good):
    (good / "model.safetensors").write_bytes(b"")
    msg = load_error(good)
    assert str(good / "model.safetensors") in msg


def test_truncated_safetensors_file(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(good)
    assert str(path) in msg


@pytest.fixture
def sharded(checkpoints, tmp_path) -> Path:
    return save_hf_checkpoint(checkpoints("pg2").hf, tmp_path / "sharded", max_shard_size="100KB")


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = load_error(sharded)
    assert str(shard) in msg


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    os.remove(shard)
    msg = load_error(sharded)
    assert str(shard) in msg


def test_invalid_shard_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    msg = load_error(sharded)
    assert "model.safetensors.index.json" in msg


def test_config_shapes_do_not_match_weights(good):
    edit_config(good, lambda c: c["text_config"].update(hidden_size=32))
    msg = load_error(good)
    # Names a key of the file and both shapes: checkpoint [.., 64] vs config [.., 32].
    m = re.search(r"(language_model\.model\.\S+|multi_modal_projector\.\S+): checkpoint \[([\d, ]+)\] vs config \[([\d, ]+)\]", msg)
    assert m, msg
    ckpt_shape, cfg_shape = m.group(2), m.group(3)
    assert "64" in ckpt_shape and "32" in cfg_shape
    assert str(good) in msg


def test_vision_config_shapes_do_not_match_weights(good):
    edit_config(good, lambda c: c["vision_config"].update(image_size=84))  # 36 positions, not 16
    msg = load_error(good)
    assert "vision_tower.embeddings.position_embedding.weight: checkpoint [16, 48] vs config [36, 48]" in msg


def test_unexpected_extra_tensor(good):
    tensors = saved_tensors(good)
    tensors["language_model.model.layers.0.self_attn.q_norm.weight"] = torch.zeros(16)
    write_safetensors(tensors, good, good)
    msg = load_error(good)
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in msg and "unexpected" in msg


def test_extra_layer_is_unexpected(good):
    """A checkpoint with more layers than config.json says (a typical config mix-up)."""
    edit_config(good, lambda c: c["text_config"].update(num_hidden_layers=1, layer_types=["sliding_attention"]))
    msg = load_error(good)
    assert "language_model.model.layers.1." in msg


def test_missing_tensor(good):
    tensors = saved_tensors(good)
    del tensors["language_model.model.norm.weight"]
    write_safetensors(tensors, good, good)
    msg = load_error(good)
    assert "missing" in msg and "language_model.norm.weight" in msg


def test_missing_layer(good):
    tensors = {k: v for k, v in saved_tensors(good).items() if not k.startswith("vision_tower.encoder.layers.1.")}
    write_safetensors(tensors, good, good)
    msg = load_error(good)
    assert "vision_tower.encoder.layers.1." in msg and "more" in msg  # 16 missing: summarised


def test_same_tensor_under_two_namings(good):
    tensors = saved_tensors(good)
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"]
    write_safetensors(tensors, good, good)
    msg = load_error(good)
    assert "norm.weight" in msg and "twice" in msg


# ----------------------------------------------------------------------------- the tied head
def test_wrong_shape_head_is_refused(good):
    tensors = saved_tensors(good)
    tensors["lm_head.weight"] = torch.zeros(7, 3)
    write_safetensors(tensors, good, good)
    msg = load_error(good)
    assert "lm_head.weight" in msg and "[7, 3]" in msg


def test_head_that_differs_from_embedding_is_refused(good):
    tensors = saved_tensors(good)
    emb = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.lm_head.weight"] = emb + 1.0
    write_safetensors(tensors, good, good)
    assert "language_model.lm_head.weight" in load_error(good)


def test_untied_head_is_loaded_or_refused(good):
    """transformers honours `tie_word_embeddings: false` with a separate head; we must either
    give the same logits or refuse the checkpoint, never silently use the embedding as head."""
    tensors = saved_tensors(good)
    g = torch.Generator().manual_seed(99)  # not conftest's seed 0, which drew the embedding
    emb = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.lm_head.weight"] = torch.randn(emb.shape, generator=g) * 0.05
    assert not torch.equal(tensors["language_model.lm_head.weight"], emb)
    write_safetensors(tensors, good, good)

    def untie(c):
        c["tie_word_embeddings"] = False
        c["text_config"]["tie_word_embeddings"] = False

    edit_config(good, untie)
    hf = load_hf_model(good)
    assert torch.equal(hf.lm_head.weight, tensors["language_model.lm_head.weight"])
    try:
        ours = load_checkpoint(good)
    except PgExportError:
        return
    cfg = ours.cfg
    ids, mask = make_prompts(cfg, [3])
    pixels = random_pixels(cfg, 1)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                 token_type_ids=torch.zeros_like(ids), position_ids=mask.cumsum(-1)).logits
        out = ours(ids, pixels, mask)
    assert (out - ref).abs().max().item() <= 1e-4
