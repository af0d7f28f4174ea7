"""Exporting a checkpoint folder streams its weights: each large weight is read once, when it is
written, and the export's memory grows by about one tensor, not by the model. (The other
streaming-export tests, same bytes and outputs as the in-memory export, are in
tests/test_onnx_export.py.) Apart from that file because the memory test alone takes minutes:
it has to trace without the trace cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pgexport.exporters import tensor_source  # noqa: E402
from pgexport.exporters.onnx_export import export_onnx  # noqa: E402
from pgexport.models.checkpoint import save_checkpoint  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402


def test_streaming_export_reads_each_weight_once(tmp_path, monkeypatch):
    """Large weights are read from the checkpoint once, when written (never by tracing or the
    optimizer), one at a time; bf16 weights are cast on the way."""
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny").replace(text=dict(hidden_size=128, intermediate_size=256))
    model = PaliGemma.random(cfg, seed=0, dtype=torch.bfloat16)
    save_checkpoint(model, tmp_path / "ckpt")
    reads: dict[str, int] = {}
    original = tensor_source.CheckpointSource.read

    def counting_read(self, name, dtype):
        reads[name] = reads.get(name, 0) + 1
        return original(self, name, dtype)

    monkeypatch.setattr(tensor_source.CheckpointSource, "read", counting_read)
    info = export_onnx(tmp_path / "ckpt", tmp_path / "out", progress=None)
    limit = 8192  # onnxscript's constant-folding input limit: smaller tensors may be read by the optimizer
    big = {k: v for k, v in model.state_dict().items() if v.numel() > limit}
    assert big and set(big) <= set(reads)
    assert {k: reads[k] for k in big} == {k: 1 for k in big}
    assert info["param_bytes"] == sum(v.numel() * 2 for v in model.state_dict().values())  # stored as bf16
    assert info["files"]["decoder.onnx.data"] + info["files"]["vision_encoder.onnx.data"] <= info["fp32_param_bytes"]
    # the exported fp32 weights are the bf16 values, exactly
    proto = onnx.load(str(tmp_path / "out" / "prefill.onnx"))
    emb = next(t for t in proto.graph.initializer if t.name == "model.language_model.embed_tokens.weight")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(emb), model.language_model.embed_tokens.weight.detach().float().numpy())


_PEAK_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from benchmarks.common import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from pgexport.exporters.onnx_export import export_onnx
from pgexport.models import PaliGemma, PaliGemmaConfig
# A tiny export first: the baseline then includes the exporter's libraries (torch.export, the
# torchlib registry, onnxscript), which load lazily on the first export.
export_onnx(PaliGemma.random(PaliGemmaConfig.from_preset("paligemma-tiny")), sys.argv[2] + "-warm", progress=None)
reset_peak_rss()
base = current_rss_bytes()
export_onnx(sys.argv[1], sys.argv[2], progress=None)
print(json.dumps({"base": base, "peak": peak_rss_bytes()}))
"""


def test_streaming_export_memory(tmp_path):
    """Exporting a checkpoint needs about one tensor of memory on top of the libraries, not the
    model: here (a model of a few hundred MiB whose largest tensor, the embedding, is a small part
    of it) the peak grows by less than half the weights (not by one tensor: freed buffers below
    glibc's mmap threshold may stay resident for a while); exporting from memory would need the
    whole model. The 3B figure: benchmarks/results/onnx_fp32.md."""
    cfg = PaliGemmaConfig.from_preset("paligemma-tiny").replace(
        text=dict(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256),
        vision=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4), image_token_id=8191)
    model = PaliGemma.random(cfg, seed=0)
    weights = sum(v.numel() * 4 for v in model.state_dict().values())
    save_checkpoint(model, tmp_path / "ckpt")
    del model
    root = Path(__file__).resolve().parent.parent
    # No trace cache: the warm-up export must load the tracer's libraries, and the measured one trace.
    env = {**os.environ, "PGEXPORT_TRACE_CACHE": "0"}
    res = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "ckpt"), str(tmp_path / "out")],
                         cwd=root, capture_output=True, text=True, check=True, env=env)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    extra = r["peak"] - r["base"]
    print(f"\nweights {weights / 2**20:.0f} MiB, export peak over baseline {extra / 2**20:.0f} MiB ({extra / weights:.2f}x)")
    assert extra < weights / 2
