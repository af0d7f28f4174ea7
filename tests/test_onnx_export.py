"""ONNX export: layout of the folder, each graph vs eager, greedy generation through ONNX Runtime.

Small and fast: the tiny presets with random weights (std 0.2 so the tokens vary), exported once
per preset.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pgexport.exporters.graphs import decode_inputs, decode_outputs, prefill_outputs  # noqa: E402
from pgexport.exporters.onnx_export import check_external_data, export_onnx  # noqa: E402
from pgexport.generation import generate_tokens  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.models.generate import EagerStepper, generate  # noqa: E402

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
    assert names == ["config.json", "decode.onnx", "decoder.onnx.data", "prefill.onnx",
                     "vision_encoder.onnx", "vision_encoder.onnx.data"]
    locations = {}
    for name in ("vision_encoder.onnx", "prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(str(out / name))
        check_external_data(out / name)
        proto = onnx.load(str(out / name), load_external_data=False)
        ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        locations[name] = {e.value for t in ext for e in t.external_data if e.key == "location"}
    assert locations["prefill.onnx"] == locations["decode.onnx"] == {"decoder.onnx.data"}
    assert locations["vision_encoder.onnx"] == {"vision_encoder.onnx.data"}
    # I/O contract
    s = _session(out / "decode.onnx")
    assert [i.name for i in s.get_inputs()] == decode_inputs(n)
    assert [o.name for o in s.get_outputs()] == decode_outputs(n)
    assert [o.name for o in _session(out / "prefill.onnx").get_outputs()] == prefill_outputs(n)
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


def test_shared_external_data_appends_and_dedupes(tmp_path):
    """Tensors of a second model that the first lacks are appended to the same file (rewritten in
    place by onnx_ir); identical tensors, within or across models, are stored once."""
    import onnx_ir as ir

    from pgexport.exporters.onnx_export import _SharedExternalData

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3))

    def model(arrays):
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8, 16]))
        inits = [ir.Value(name=f"w{i}", const_value=ir.tensor(arr, name=f"w{i}"), type=ir.TensorType(ir.DataType.FLOAT),
                          shape=ir.Shape(arr.shape)) for i, arr in enumerate(arrays)]
        nodes, prev = [], x
        for w in inits:
            nodes.append(ir.node("Add", [prev, w]))
            prev = nodes[-1].outputs[0]
        prev.name, prev.type, prev.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([8, 16])
        graph = ir.Graph([x], [prev], nodes=nodes, initializers=inits, opset_imports={"": 20}, name="g")
        return ir.Model(graph, ir_version=10)

    m1, m2 = model([a, b, a]), model([b, c])
    store = _SharedExternalData(tmp_path, "shared.data")
    store.add(m1)
    store.flush()
    store.add(m2)
    store.finish()
    ir.save(m1, tmp_path / "m1.onnx")
    ir.save(m2, tmp_path / "m2.onnx")
    assert (tmp_path / "shared.data").stat().st_size == 3 * a.nbytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.onnx", "m2.onnx", "shared.data"]
    x = rng.standard_normal((8, 16)).astype(np.float32)
    for name, arrays in (("m1.onnx", [a, b, a]), ("m2.onnx", [b, c])):
        onnx.checker.check_model(str(tmp_path / name))
        check_external_data(tmp_path / name)
        (y,) = _session(tmp_path / name).run(None, {"x": x})
        ref = x
        for arr in arrays:  # same order as the graph's Adds
            ref = ref + arr
        np.testing.assert_array_equal(y, ref)
