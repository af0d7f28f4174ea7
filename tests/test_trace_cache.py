"""The cache of traced graphs (`exporters/trace_cache.py`): a cached trace gives byte for byte the
graph of a fresh one without calling `torch.onnx.export`; another geometry, dtype, opset or
source code is traced again, and so is an unreadable entry."""

from __future__ import annotations

import pytest
import torch

onnx_ir = pytest.importorskip("onnx_ir")

from pgexport.exporters import onnx_export, trace_cache  # noqa: E402
from pgexport.exporters.graphs import PrefillGraph, VisionEncoderGraph  # noqa: E402
from pgexport.exporters.onnx_export import DEFAULT_OPSET, export_graph, fake_model, open_source  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402


@pytest.fixture
def traces(tmp_path, monkeypatch):
    """An empty cache folder, and the number of real traces made so far (a one-item list)."""
    monkeypatch.setenv("PGEXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(trace_cache.ENV_SWITCH, raising=False)
    calls = [0]
    original = torch.onnx.export

    def counting_export(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting_export)
    return tmp_path / "cache" / "traces", calls


def _vision_graph_bytes(cfg: PaliGemmaConfig, seed: int = 0) -> bytes:
    """The vision encoder graph of a random model, weights bound and included, serialized."""
    model = PaliGemma.random(cfg, seed=seed)
    _, source = open_source(model)
    fake_mode, fake = fake_model(cfg, torch.float32)
    graph = export_graph(VisionEncoderGraph(fake), DEFAULT_OPSET, source, torch.float32, fake_mode)
    return onnx_ir.to_proto(graph).SerializeToString()


def test_cached_trace_equals_a_fresh_one(traces, monkeypatch):
    folder, calls = traces
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny")
    monkeypatch.setenv(trace_cache.ENV_SWITCH, "0")
    uncached = _vision_graph_bytes(cfg)
    assert calls[0] == 1 and not folder.exists()
    monkeypatch.delenv(trace_cache.ENV_SWITCH)

    assert _vision_graph_bytes(cfg) == uncached  # traced and stored
    assert calls[0] == 2 and len(list(folder.glob("*.onnx"))) == 1
    assert _vision_graph_bytes(cfg) == uncached  # from the cache
    assert calls[0] == 2
    # other weights, same geometry: the trace is reused, the weights are the new ones
    other = _vision_graph_bytes(cfg, seed=1)
    assert calls[0] == 2 and other != uncached and len(other) == len(uncached)

    # another geometry is traced, and kept beside the first
    _vision_graph_bytes(cfg.replace(vision=dict(image_size=84)))
    assert calls[0] == 3 and len(list(folder.glob("*.onnx"))) == 2

    # an unreadable entry is traced again and replaced
    entry = min(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
    entry.write_bytes(entry.read_bytes()[:100])
    for f in folder.glob("*.onnx"):
        if f != entry:
            f.unlink()
    assert _vision_graph_bytes(cfg) == uncached
    assert calls[0] == 4 and len(entry.read_bytes()) > 100


def test_key_covers_dtype_opset_config_and_code(monkeypatch):
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny")
    _, fake = fake_model(cfg, torch.float32)
    graph = VisionEncoderGraph(fake)
    key = trace_cache.trace_key(graph, 20, torch.float32)
    assert trace_cache.trace_key(graph, 20, torch.float32) == key
    assert trace_cache.trace_key(graph, 21, torch.float32) != key
    assert trace_cache.trace_key(graph, 20, torch.float16) != key
    _, fake2 = fake_model(cfg.replace(vision=dict(layer_norm_eps=1e-5)), torch.float32)
    assert trace_cache.trace_key(VisionEncoderGraph(fake2), 20, torch.float32) != key  # every vision field counts
    _, fake3 = fake_model(cfg.replace(text=dict(hidden_size=128, intermediate_size=256)), torch.float32)
    assert trace_cache.trace_key(VisionEncoderGraph(fake3), 20, torch.float32) != key  # the projector's width
    _, fake4 = fake_model(cfg.replace(text=dict(rms_norm_eps=1e-5)), torch.float32)
    assert trace_cache.trace_key(PrefillGraph(fake4), 20, torch.float32) != trace_cache.trace_key(PrefillGraph(fake), 20, torch.float32)
    monkeypatch.setattr(trace_cache, "code_digest", lambda: "edited")
    assert trace_cache.trace_key(graph, 20, torch.float32) != key


def test_vision_trace_is_shared_across_decoders(traces, monkeypatch):
    """The vision encoder's key leaves the decoder's config out: sound only if a model that differs
    in its decoder alone (Gemma 1 against Gemma 2) traces to the same vision graph."""
    monkeypatch.setenv(trace_cache.ENV_SWITCH, "0")
    pg1, pg2 = PaliGemmaConfig.from_preset("paligemma-tiny"), PaliGemmaConfig.from_preset("paligemma2-tiny")
    assert pg1.vision == pg2.vision and pg1.text != pg2.text
    wrappers, traces_bytes = [], []
    for cfg in (pg1, pg2):
        fake_mode, fake = fake_model(cfg, torch.float32)
        graph = VisionEncoderGraph(fake).eval()
        fresh = trace_cache.traced(graph, DEFAULT_OPSET, torch.float32,
                                   lambda g=graph, m=fake_mode: onnx_export.trace_graph(g, DEFAULT_OPSET, m))
        wrappers.append(graph)
        traces_bytes.append(onnx_ir.to_proto(fresh).SerializeToString())
    assert traces_bytes[0] == traces_bytes[1]
    keys = [trace_cache.trace_key(g, DEFAULT_OPSET, torch.float32) for g in wrappers]
    assert keys[0] == keys[1]


def test_unbound_weight_is_refused(traces):
    """A cached graph whose weight has no tensor in the source fails loudly, as a fake one did."""
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny")
    _vision_graph_bytes(cfg)
    model = PaliGemma.random(cfg)
    state = model.state_dict()
    name = next(k for k in state if k.startswith("vision"))
    source = onnx_export.StateDictSource({k: v for k, v in state.items() if k != name})
    fake_mode, fake = fake_model(cfg, torch.float32)
    with pytest.raises(RuntimeError, match="has no weight in the source"):
        export_graph(VisionEncoderGraph(fake), DEFAULT_OPSET, source, torch.float32, fake_mode)


def test_concurrent_exports_of_one_geometry_trace_once(traces):
    """A second export that misses the cache while the first is tracing the same key waits for the
    first's entry instead of tracing again."""
    import threading

    import onnx
    from onnx import TensorProto, helper

    folder, _ = traces
    _, fake = fake_model(PaliGemmaConfig.from_preset("paligemma-tiny"), torch.float32)
    graph = VisionEncoderGraph(fake)
    started, second_calling = threading.Event(), threading.Event()
    calls = []

    def trace():  # stands in for torch.onnx.export: the first call holds on until the second export has started
        calls.append(threading.current_thread().name)
        started.set()
        if len(calls) == 1:
            second_calling.wait(timeout=30)
            threading.Event().wait(0.5)  # let the second reach the cache
        vi = helper.make_tensor_value_info
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
        return onnx_ir.from_proto(helper.make_model(g))

    results = {}

    def export(name):
        results[name] = trace_cache.traced(graph, DEFAULT_OPSET, torch.float32, trace)

    first = threading.Thread(target=export, args=("first",), name="first")
    first.start()
    assert started.wait(timeout=30)
    second = threading.Thread(target=export, args=("second",), name="second")
    second.start()
    second_calling.set()
    first.join(60)
    second.join(60)
    assert calls == ["first"]
    assert onnx.printer.to_text(onnx_ir.to_proto(results["first"])) == onnx.printer.to_text(onnx_ir.to_proto(results["second"]))
    assert len(list(folder.glob("*.onnx"))) == 1
