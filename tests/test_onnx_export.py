"""ONNX export: layout of the folder, each graph vs eager, greedy generation through ONNX Runtime;
streaming from a checkpoint folder (same bytes and outputs as the in-memory export, bad folders
refused; each weight read once and the memory of about one tensor: tests/test_export_memory.py);
the fp16 export (I/O dtypes, accuracy against eager fp32 on ONNX Runtime's CPU provider); the
opt-in ORT fusions.

Small and fast: the tiny presets with random weights (std 0.2 so the tokens vary), exported once
per preset.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pgexport.exporters.graphs import decoder_inputs, decode_inputs, decode_outputs, prefill_outputs  # noqa: E402
from pgexport.exporters.onnx_export import export_onnx  # noqa: E402
from pgexport.runtime.onnx_files import check_external_data  # noqa: E402
from pgexport.runtime.generation import generate_tokens  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.eager.generate import generate  # noqa: E402
from pgexport.models.generate import EagerStepper  # noqa: E402

PRESETS = ["paligemma-tiny", "paligemma2-tiny"]
TOL = 1e-4


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, tmp_path_factory):
    cfg = PaliGemmaConfig.from_preset(request.param)
    model = PaliGemma.random(cfg, seed=0, std=0.2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a wrong norm would show
                p.normal_(0.0, 0.5, generator=g)
            if "post_" in name:  # louder blocks: a random Gemma 2 otherwise repeats its last token
                p += 4.0
    out = tmp_path_factory.mktemp("onnx") / request.param
    info = export_onnx(model, out, progress=None)
    return model, out, info


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _batch(cfg, lengths=(9, 4), padding="left", seed=0):
    """Two prompts `<image>*N <bos> text \\n` of different lengths, padded to one length."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    rows = [[cfg.image_token_id] * n + [cfg.bos_token_id] + list(rng.integers(3, 500, k)) + [108] for k in lengths]
    S = max(map(len, rows))
    ids = np.full((len(rows), S), cfg.pad_token_id, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for i, r in enumerate(rows):
        sl = slice(S - len(r), S) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    pix = rng.uniform(-1, 1, (len(rows), 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, mask, pix


class OrtStepper:
    """vision -> prefill -> decode, feeding `present` back as `past_key_values`."""

    def __init__(self, folder, num_layers):
        self.vision = _session(folder / "vision_encoder.onnx")
        self.prefill_s = _session(folder / "prefill.onnx")
        self.decode_s = _session(folder / "decode.onnx")
        self.past_names = decode_inputs(num_layers)[2:]

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens):
        (features,) = self.vision.run(None, {"pixel_values": pixel_values})
        out = self.prefill_s.run(None, {"input_ids": input_ids, "image_features": features, "attention_mask": attention_mask})
        self.past, self.mask = out[1:], attention_mask
        return out[0]

    def decode(self, tokens):
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        feed = {"input_ids": tokens[:, None].astype(np.int64), "attention_mask": self.mask, **dict(zip(self.past_names, self.past))}
        out = self.decode_s.run(None, feed)
        self.past = out[1:]
        return out[0]


def test_folder_layout(exported):
    model, out, info = exported
    n = model.cfg.text.num_hidden_layers
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "decode.onnx", "decoder.onnx", "decoder.onnx.data", "prefill.onnx",
                     "vision_encoder.onnx", "vision_encoder.onnx.data"]
    locations = {}
    for name in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(out / name))
        check_external_data(out / name)
        proto = onnx.load(str(out / name), load_external_data=False)
        ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        locations[name] = {e.value for t in ext for e in t.external_data if e.key == "location"}
    assert locations["prefill.onnx"] == locations["decode.onnx"] == locations["decoder.onnx"] == {"decoder.onnx.data"}
    assert locations["vision_encoder.onnx"] == {"vision_encoder.onnx.data"}
    # I/O contract
    s = _session(out / "decode.onnx")
    assert [i.name for i in s.get_inputs()] == decode_inputs(n)
    assert [o.name for o in s.get_outputs()] == decode_outputs(n)
    assert [o.name for o in _session(out / "prefill.onnx").get_outputs()] == prefill_outputs(n)
    merged = _session(out / "decoder.onnx")
    assert [i.name for i in merged.get_inputs()] == decoder_inputs(n)
    assert [o.name for o in merged.get_outputs()] == decode_outputs(n)
    # every parameter stored at most once: the data files are no larger than the parameters
    data = info["files"]["decoder.onnx.data"] + info["files"]["vision_encoder.onnx.data"]
    print(f"\n{out.name}: folder {info['total_bytes']} B, data {data} B, fp32 params {info['fp32_param_bytes']} B, "
          f"folder/params {info['size_ratio']:.3f}x, data/params {data / info['fp32_param_bytes']:.3f}x")
    assert data <= info["fp32_param_bytes"]
    assert info["size_ratio"] < 1.25  # the tiny graphs' structure is ~10% of their weights


@pytest.mark.parametrize("padding", ["left", "right"])
def test_graphs_match_eager(exported, padding):
    model, out, _ = exported
    cfg = model.cfg
    n = cfg.text.num_hidden_layers
    ids, mask, pix = _batch(cfg, padding=padding)
    S = ids.shape[1]

    vision, prefill, decode = (_session(out / f) for f in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx"))
    (feats,) = vision.run(None, {"pixel_values": pix})
    with torch.no_grad():
        ref_feats = model.encode_image(torch.from_numpy(pix)).numpy()
    assert feats.shape == (2, cfg.num_image_tokens, cfg.text.hidden_size)
    np.testing.assert_allclose(feats, ref_feats, rtol=0, atol=TOL)

    eager = EagerStepper(model)
    ref_logits = eager.prefill(ids, mask, pix, max_new_tokens=3)
    got = prefill.run(None, {"input_ids": ids, "image_features": feats, "attention_mask": mask})
    assert got[0].shape == (2, cfg.text.vocab_size)
    np.testing.assert_allclose(got[0], ref_logits, rtol=0, atol=TOL)
    for i in range(n):
        np.testing.assert_allclose(got[1 + 2 * i], eager.cache.k[i][:, :, :S].numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(got[2 + 2 * i], eager.cache.v[i][:, :, :S].numpy(), rtol=0, atol=TOL)

    past = got[1:]
    for step in range(2):
        tokens = np.array([5 + step, 300 + step], np.int64)
        ref_logits = eager.decode(tokens)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feed = {"input_ids": tokens[:, None], "attention_mask": mask, **dict(zip(decode_inputs(n)[2:], past))}
        got = decode.run(None, feed)
        np.testing.assert_allclose(got[0], ref_logits, rtol=0, atol=TOL)
        T = S + step + 1
        for i in range(n):
            assert got[1 + 2 * i].shape == (2, cfg.text.num_key_value_heads, T, cfg.text.head_dim)
            np.testing.assert_allclose(got[1 + 2 * i], eager.cache.k[i][:, :, :T].numpy(), rtol=0, atol=TOL)
            np.testing.assert_allclose(got[2 + 2 * i], eager.cache.v[i][:, :, :T].numpy(), rtol=0, atol=TOL)
        past = got[1:]


class MergedStepper:
    """vision -> decoder.onnx as prefill (cache_position 0..S-1, token_type_ids 0) -> decoder.onnx
    as decode (one slot each), with plain `session.run`: the cache buffers go in and come out."""

    def __init__(self, folder, cfg):
        self.vision, self.decoder, self.cfg = _session(folder / "vision_encoder.onnx"), _session(folder / "decoder.onnx"), cfg
        self.past_names = decoder_inputs(cfg.text.num_hidden_layers)[5:]

    def buffers(self, batch, length):
        t = self.cfg.text
        return [np.zeros((batch, t.num_key_value_heads, length, t.head_dim), np.float32)] * len(self.past_names)

    def run(self, ids, feats, mask, token_type, cache_position, past):
        out = self.decoder.run(None, {"input_ids": ids, "image_features": feats, "attention_mask": mask,
                                      "token_type_ids": token_type, "cache_position": cache_position,
                                      **dict(zip(self.past_names, past))})
        self.past = out[1:]
        return out[0]

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens):
        (feats,) = self.vision.run(None, {"pixel_values": pixel_values})
        B, S = input_ids.shape
        self.mask = np.concatenate([attention_mask, np.zeros((B, max_new_tokens), np.int64)], axis=1)
        self.slot = S
        return self.run(input_ids, feats, self.mask, np.zeros_like(input_ids), np.arange(S), self.buffers(B, S + max_new_tokens))

    def decode(self, tokens):
        self.mask[:, self.slot] = 1
        none = np.zeros((len(tokens), 0, self.cfg.text.hidden_size), np.float32)
        self.slot += 1
        return self.run(tokens[:, None].astype(np.int64), none, self.mask, np.ones((len(tokens), 1), np.int64),
                        np.array([self.slot - 1]), self.past)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_decoder_graph_is_prefill_and_decode(exported, padding):
    """decoder.onnx (one graph for both steps) gives the prefill and decode graphs' logits and
    cache, and the same greedy tokens as eager PyTorch."""
    model, out, _ = exported
    cfg = model.cfg
    ids, mask, pix = _batch(cfg, lengths=(11, 3), padding=padding, seed=1)
    split, merged = OrtStepper(out, cfg.text.num_hidden_layers), MergedStepper(out, cfg)
    np.testing.assert_allclose(merged.prefill(ids, mask, pix, 4), split.prefill(ids, mask, pix, 4), rtol=0, atol=TOL)
    S = ids.shape[1]
    for a, b in zip(merged.past, split.past):
        assert a.shape[2] == S + 4  # the buffer: prompt + max_new_tokens slots
        np.testing.assert_allclose(a[:, :, :S], b, rtol=0, atol=TOL)
        assert not a[:, :, S:].any()  # slots not written yet stay as they came in
    for step in range(3):
        tokens = np.array([5 + step, 300 + step], np.int64)
        np.testing.assert_allclose(merged.decode(tokens), split.decode(tokens), rtol=0, atol=TOL)
    for a, b in zip(merged.past, split.past):
        np.testing.assert_allclose(a[:, :, :S + 3], b, rtol=0, atol=TOL)
    ref = generate(model, ids, mask, pix, max_new_tokens=12)
    got = generate_tokens(MergedStepper(out, cfg), ids, mask, pix, 12, cfg.eos_token_id, cfg.pad_token_id)
    assert got.tolist() == ref.tolist()


def test_decoder_graph_scores_a_suffix_in_one_call(exported):
    """token_type_ids split one call into a bidirectional prompt and a causal suffix: the logits
    after the suffix equal prefill over the prompt followed by one decode step per suffix token."""
    model, out, _ = exported
    cfg = model.cfg
    ids, mask, pix = _batch(cfg, lengths=(6,), padding="left", seed=4)
    suffix = np.array([[301, 57, 402]], np.int64)
    stepped = MergedStepper(out, cfg)
    stepped.prefill(ids, mask, pix, 4)
    for t in suffix[0]:
        want = stepped.decode(np.array([t]))
    one = MergedStepper(out, cfg)
    (feats,) = one.vision.run(None, {"pixel_values": pix})
    all_ids = np.concatenate([ids, suffix], axis=1)
    token_type = np.concatenate([np.zeros_like(ids), np.ones_like(suffix)], axis=1)
    S = all_ids.shape[1]
    got = one.run(all_ids, feats, np.ones_like(all_ids), token_type, np.arange(S), one.buffers(1, S))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_decoder_graph_writes_its_cache_in_place(exported, tmp_path):
    """Each `present` output of decoder.onnx is its `past` input with the new slots scattered in
    (the only reader of `past`), so ONNX Runtime updates a buffer bound as both in place: checked
    on the graph, and on a step run with I/O binding (the buffer's memory holds the new keys, the
    slots before the step are untouched, and the logits equal the copying run's)."""
    model, out, _ = exported
    cfg = model.cfg
    proto = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    n_layers = cfg.text.num_hidden_layers
    for past, present in zip(decoder_inputs(n_layers)[5:], decode_outputs(n_layers)[1:]):
        node = producer[present]
        assert node.op_type == "ScatterElements" and node.input[0] == past
        # Shape reads no data; any other reader of `past` would see the step's writes.
        assert [r.op_type for r in readers[past] if r.op_type != "Shape"] == ["ScatterElements"]
    # Every buffer, key or value, input or output, has the mask's length by name.
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.input, *proto.graph.output]}
    assert shapes["attention_mask"][1] == "max_sequence_length"
    for name in [*decoder_inputs(n_layers)[5:], *decode_outputs(n_layers)[1:]]:
        assert shapes[name][2] == "max_sequence_length", (name, shapes[name])
    # The attention reads the key buffer where it lies: once ONNX Runtime has optimized the graph,
    # no node copies a cache buffer (a Transpose or Mul of a key cache would, at every step).
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    caches = set(decode_outputs(n_layers)[1:])
    readers = sorted({n.op_type for n in optimized.graph.node if caches & set(n.input)})
    assert readers == ["FusedMatMul", "MatMul"] or readers == ["FusedMatMul", "MatMul", "Shape"], readers

    ids, mask, pix = _batch(cfg, lengths=(7, 3), padding="right", seed=2)
    copying = MergedStepper(out, cfg)
    copying.prefill(ids, mask, pix, 3)
    S, tokens = ids.shape[1], np.array([[11], [12]], np.int64)
    before = [p.copy() for p in copying.past]
    want = copying.decode(tokens[:, 0])
    buffers = [ort.OrtValue.ortvalue_from_numpy(p.copy()) for p in before]
    binding = copying.decoder.io_binding()
    feed = {"input_ids": tokens, "image_features": np.zeros((2, 0, cfg.text.hidden_size), np.float32),
            "attention_mask": copying.mask, "token_type_ids": np.ones_like(tokens), "cache_position": np.array([S])}
    for name, x in feed.items():
        binding.bind_cpu_input(name, x)
    binding.bind_output("logits")
    for past, present, buf in zip(decoder_inputs(n_layers)[5:], decode_outputs(n_layers)[1:], buffers):
        binding.bind_ortvalue_input(past, buf)
        binding.bind_ortvalue_output(present, buf)
    copying.decoder.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    np.testing.assert_allclose(outputs[0].numpy(), want, rtol=0, atol=TOL)
    for buf, got, old, new in zip(buffers, outputs[1:], before, copying.past):
        assert got.data_ptr() == buf.data_ptr()
        np.testing.assert_array_equal(buf.numpy()[:, :, :S], old[:, :, :S])
        np.testing.assert_allclose(buf.numpy()[:, :, S], new[:, :, S], rtol=0, atol=TOL)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_greedy_generation_matches_eager(exported, padding):
    model, out, _ = exported
    cfg = model.cfg
    ids, mask, pix = _batch(cfg, lengths=(11, 3), padding=padding, seed=1)
    ref = generate(model, ids, mask, pix, max_new_tokens=20)
    stepper = OrtStepper(out, cfg.text.num_hidden_layers)
    got = generate_tokens(stepper, ids, mask, pix, 20, cfg.eos_token_id, cfg.pad_token_id)
    assert got.tolist() == ref.tolist()
    assert len(set(ref.reshape(-1).tolist())) > 2  # the random model does not emit one token forever


def test_single_prompt_and_other_shapes(exported):
    """Batch 1 and batch 3 (traced at batch 2), a short prompt: the dynamic axes really are dynamic."""
    model, out, _ = exported
    cfg = model.cfg
    stepper = OrtStepper(out, cfg.text.num_hidden_layers)
    for lengths in [(1,), (2, 7, 4)]:
        ids, mask, pix = _batch(cfg, lengths=lengths, padding="left", seed=3)
        ref = generate(model, ids, mask, pix, max_new_tokens=6)
        got = generate_tokens(stepper, ids, mask, pix, 6, cfg.eos_token_id, cfg.pad_token_id)
        assert got.tolist() == ref.tolist()


def test_data_file_stores_each_tensor_once(tmp_path):
    """`DataFile` (the writer of the export's and the quantizer's external data): equal bytes of
    the same type are stored once, also after a flush (a second graph appending to the file),
    equal bytes of another type are kept apart, and every tensor starts at a multiple of `align`."""
    from pgexport.exporters.external_data import DataFile

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3))  # 60 bytes: not aligned
    data = DataFile(tmp_path / "shared.data", align=64)
    where_a, where_b = data.write(onnx.TensorProto.FLOAT, a), data.write(onnx.TensorProto.FLOAT, b)
    assert data.write(onnx.TensorProto.FLOAT, a.copy()) == where_a
    data.flush()
    where_c = data.write(onnx.TensorProto.FLOAT, c)
    assert data.write(onnx.TensorProto.FLOAT, b) == where_b
    where_int = data.write(onnx.TensorProto.INT32, a.view(np.int32))
    data.close()
    written = {where_a: a, where_b: b, where_c: c, where_int: a}
    assert len(written) == 4
    raw = (tmp_path / "shared.data").read_bytes()
    for (offset, length), array in written.items():
        assert offset % 64 == 0 and length == array.nbytes
        assert raw[offset:offset + length] == array.tobytes()
    assert len(raw) == max(offset + length for offset, length in written)


def test_prefill_and_decode_share_their_weights(exported):
    """prefill.onnx and decode.onnx point their common weights at the same bytes of
    decoder.onnx.data, which holds each distinct tensor once, back to back."""
    _, out, info = exported
    refs = {name: {r.name: (r.location, r.offset, r.length) for r in check_external_data(out / name)}
            for name in ("prefill.onnx", "decode.onnx")}
    common = set(refs["prefill.onnx"]) & set(refs["decode.onnx"])
    assert any("embed_tokens" in name for name in common)
    assert {n: refs["prefill.onnx"][n] for n in common} == {n: refs["decode.onnx"][n] for n in common}
    spans = sorted({(offset, length) for graph in refs.values() for _, offset, length in graph.values()})
    assert [offset for offset, _ in spans] == [0] + [o + n for o, n in spans[:-1]]  # no gaps, no overlaps
    assert sum(n for _, n in spans) == (out / "decoder.onnx.data").stat().st_size == info["files"]["decoder.onnx.data"]


# ----------------------------------------------------------------------------- streaming export
def _tiny_model(preset: str, seed: int = 0):
    """The tiny test model of `exported` (random, norms moved away from zero)."""
    cfg = PaliGemmaConfig.from_preset(preset)
    model = PaliGemma.random(cfg, seed=seed, std=0.2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5, generator=g)
            if "post_" in name:
                p += 4.0
    return model


def _run_all(folder, cfg, seed=0):
    """Every output of the three graphs on one padded batch (prefill, then two decode steps)."""
    n = cfg.text.num_hidden_layers
    ids, mask, pix = _batch(cfg, seed=seed)
    vision, prefill, decode = (_session(folder / f) for f in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx"))
    (feats,) = vision.run(None, {"pixel_values": pix})
    outs = [feats]
    got = prefill.run(None, {"input_ids": ids, "image_features": feats, "attention_mask": mask})
    outs += got
    for step in range(2):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feed = {"input_ids": np.array([[5 + step], [300 + step]], np.int64), "attention_mask": mask,
                **dict(zip(decode_inputs(n)[2:], got[1:]))}
        got = decode.run(None, feed)
        outs += got
    return outs


@pytest.mark.parametrize("preset", PRESETS)
def test_streaming_export_equals_in_memory(preset, tmp_path):
    """A checkpoint folder exported by streaming its safetensors gives the same bytes and the same
    outputs, exactly, as the loaded model exported from memory."""
    from pgexport.models.checkpoint import load_checkpoint, save_checkpoint

    model = _tiny_model(preset)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt, max_shard_bytes=200_000)  # several shards
    assert (ckpt / "model.safetensors.index.json").is_file()
    streamed = export_onnx(ckpt, tmp_path / "streamed", progress=None)
    in_memory = export_onnx(load_checkpoint(ckpt), tmp_path / "memory", progress=None)
    assert streamed["files"] == in_memory["files"] and streamed["tensors"] == in_memory["tensors"]
    assert streamed["param_bytes"] == in_memory["param_bytes"] == in_memory["fp32_param_bytes"]
    for name in streamed["files"]:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    a, b = _run_all(tmp_path / "streamed", model.cfg), _run_all(tmp_path / "memory", model.cfg)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("variant", ["pg1", "pg2"])
def test_streaming_export_of_transformers_checkpoint(variant, checkpoints, tmp_path):
    """A folder written by transformers' `save_pretrained` (its own key naming) streams to the same
    files as its loaded model exported from memory."""
    from pgexport.models.checkpoint import load_checkpoint

    ck = checkpoints(variant)
    streamed = export_onnx(ck.folder, tmp_path / "streamed", progress=None)
    in_memory = export_onnx(load_checkpoint(ck.folder), tmp_path / "memory", progress=None)
    assert streamed["files"] == in_memory["files"]
    for name in streamed["files"]:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name


def test_bad_checkpoints_are_refused(tmp_path):
    from pgexport.errors import PgExportError
    from pgexport.models.checkpoint import save_checkpoint
    from safetensors.torch import load_file, save_file

    model = PaliGemma.random(PaliGemmaConfig.from_preset("paligemma-tiny"))
    good = tmp_path / "good"
    save_checkpoint(model, good)
    tensors = load_file(good / "model.safetensors")

    def variant(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((good / "config.json").read_text())
        t = dict(tensors)
        edit(t)
        save_file(t, folder / "model.safetensors")
        return folder

    cases = {
        "missing": (lambda t: t.pop("language_model.model.norm.weight"), "missing tensor for language_model.norm.weight"),
        "shape": (lambda t: t.__setitem__("language_model.model.norm.weight", torch.zeros(3)), "vs config"),
        "extra": (lambda t: t.__setitem__("language_model.model.extra.weight", torch.zeros(3)), "unexpected tensor"),
        "untied": (lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["language_model.model.embed_tokens.weight"])), "untied head"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(PgExportError, match=message):
            export_onnx(variant(name, edit), tmp_path / f"out-{name}", progress=None)
        assert not (tmp_path / f"out-{name}").exists()
    # an explicit head equal to the embedding is accepted (as load_checkpoint accepts it)
    tied = variant("tied", lambda t: t.__setitem__("lm_head.weight", t["language_model.model.embed_tokens.weight"].clone()))
    export_onnx(tied, tmp_path / "out-tied", progress=None)
    # a truncated file
    trunc = variant("trunc", lambda t: None)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PgExportError, match="corrupt or truncated"):
        export_onnx(trunc, tmp_path / "out-trunc", progress=None)
    with pytest.raises(PgExportError, match="dtype"):
        export_onnx(good, tmp_path / "out-bf16", progress=None, dtype="bfloat16")


# ----------------------------------------------------------------------------- fp16
@pytest.fixture(scope="module", params=PRESETS)
def exported_fp16(request, tmp_path_factory):
    model = _tiny_model(request.param)
    out = tmp_path_factory.mktemp("onnx16") / request.param
    with pytest.warns(UserWarning, match="overflow fp16") if model.cfg.is_paligemma2 else contextlib.nullcontext():
        info = export_onnx(model, out, progress=None, dtype="float16")
    return model, out, info


def test_fp16_layout_and_dtypes(exported_fp16):
    model, out, info = exported_fp16
    n = model.cfg.text.num_hidden_layers
    assert info["dtype"] == "float16"
    data = info["files"]["decoder.onnx.data"] + info["files"]["vision_encoder.onnx.data"]
    assert data <= 0.55 * info["fp32_param_bytes"]  # weights stored in fp16 (a few fp32 norm vectors)
    types = {}
    for name in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(str(out / name))
        check_external_data(out / name)
        s = _session(out / name)
        types[name] = {v.name: v.type for v in [*s.get_inputs(), *s.get_outputs()]}
    assert types["vision_encoder.onnx"] == {"pixel_values": "tensor(float)", "image_features": "tensor(float16)"}
    for name in ("prefill.onnx", "decode.onnx"):
        assert types[name]["logits"] == "tensor(float)"  # logits are float32 in every export
        assert {types[name][k] for k in prefill_outputs(n)[1:]} == {"tensor(float16)"}
    assert types["prefill.onnx"]["image_features"] == "tensor(float16)"
    assert {types["decode.onnx"][k] for k in decode_inputs(n)[2:]} == {"tensor(float16)"}
    # large weights in fp16; what stays fp32 is small (RMSNorm's 1 + w, computed in fp32)
    proto = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    big = [(t.name, t.data_type) for t in proto.graph.initializer if np.prod(t.dims) >= 4096]
    assert big and all(dt == onnx.TensorProto.FLOAT16 for _, dt in big), big


def test_fp16_matches_eager_fp32(exported_fp16, record_diff):
    """ONNX Runtime's CPU EP runs the fp16 graphs (it computes most ops in fp32 after inserting
    Casts, as x86 has few fp16 kernels). Tolerance: the export may add no more error than running
    the same weights in fp16 in PyTorch does (its error against eager fp32, x2), and stays within
    1% of the logits' range; greedy tokens agree with eager fp32."""
    model, out, _ = exported_fp16
    cfg = model.cfg
    ids, mask, pix = _batch(cfg)
    stepper = OrtStepper(out, cfg.text.num_hidden_layers)
    ref32 = EagerStepper(model)
    model16 = PaliGemma.random(cfg, dtype=torch.float16)
    model16.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    ref16 = EagerStepper(model16)

    (feats,) = stepper.vision.run(None, {"pixel_values": pix})
    with torch.no_grad():
        f32 = model.encode_image(torch.from_numpy(pix)).numpy()
        f16 = model16.encode_image(torch.from_numpy(pix)).float().numpy()
    err, own = np.abs(feats.astype(np.float32) - f32).max(), np.abs(f16 - f32).max()
    record_diff("fp16 image_features", err)
    assert err <= 2 * own and err <= 0.01 * np.abs(f32).max(), (err, own)

    got = [stepper.prefill(ids, mask, pix, 3)]
    r32 = [ref32.prefill(ids, mask, pix, 3)]
    r16 = [ref16.prefill(ids, mask, pix, 3)]
    for step in range(2):
        tokens = np.array([5 + step, 300 + step], np.int64)
        got.append(stepper.decode(tokens))
        r32.append(ref32.decode(tokens))
        r16.append(ref16.decode(tokens))
    for i, (g, a, b) in enumerate(zip(got, r32, r16)):
        assert g.dtype == np.float32
        err, own = np.abs(g - a).max(), np.abs(b - a).max()
        record_diff(f"fp16 logits step {i}", err)
        assert err <= 2 * own and err <= 0.01 * np.abs(a).max(), (i, err, own)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_fp16_greedy_generation(exported_fp16, padding):
    model, out, _ = exported_fp16
    cfg = model.cfg
    ids, mask, pix = _batch(cfg, lengths=(11, 3), padding=padding, seed=1)
    ref = generate(model, ids, mask, pix, max_new_tokens=20)
    got = generate_tokens(OrtStepper(out, cfg.text.num_hidden_layers), ids, mask, pix, 20, cfg.eos_token_id, cfg.pad_token_id)
    assert (got == ref).mean() >= 0.9, (got.tolist(), ref.tolist())


# ----------------------------------------------------------------------------- ORT fusions (opt-in)
def test_ort_fusions_vision_encoder(tmp_path):
    """`ort_fusions=True` puts ONNX Runtime's Attention / SkipLayerNormalization in the fp32 vision
    encoder (checked by onnx.checker, outputs within the exporter's tolerance); decoder graphs stay
    standard ONNX."""
    model = _tiny_model("paligemma-tiny")
    info = export_onnx(model, tmp_path / "fused", progress=None, ort_fusions=True)
    assert info["ort_fusions"] == {"vision_encoder.onnx": True, "prefill.onnx": False, "decode.onnx": False,
                                   "decoder.onnx": False}
    ops = {}
    for name in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx"):
        proto = onnx.load(str(tmp_path / "fused" / name), load_external_data=False)
        ops[name] = {(n.domain, n.op_type) for n in proto.graph.node}
    assert {("com.microsoft", "Attention"), ("com.microsoft", "SkipLayerNormalization")} <= ops["vision_encoder.onnx"]
    assert all(domain in ("", "ai.onnx") for name in ("prefill.onnx", "decode.onnx") for domain, _ in ops[name])
    _, _, pix = _batch(model.cfg)
    (feats,) = _session(tmp_path / "fused" / "vision_encoder.onnx").run(None, {"pixel_values": pix})
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pix)).numpy()
    np.testing.assert_allclose(feats, ref, rtol=0, atol=TOL)
    # the default export has no contrib ops at all
    plain = export_onnx(model, tmp_path / "plain", progress=None)
    assert not any(plain["ort_fusions"].values())
    proto = onnx.load(str(tmp_path / "plain" / "vision_encoder.onnx"), load_external_data=False)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
