"""`pgexport bench`: report schema, plots, accuracy judgement and `--compare`, on the tiny preset."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from pgexport.bench.run import run_bench
from pgexport.bench.report import PLOTS, SCHEMA, compare_reports
from pgexport.cli import main

STATS_KEYS = {"n", "median", "p10", "p90", "min", "max", "mean"}


# run_bench starts a worker process per backend (and exports the ONNX variants): the tests that
# use this fixture are marked slow.
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    model = base / "model"
    CliRunner().invoke(main, ["init", "--preset", "paligemma-tiny", "--out", str(model)], catch_exceptions=False)
    report = run_bench(model, ["torch", "onnx-int8"], images=2, new_tokens=5, repeats=2, out=base / "report",
                       cache=base / "cache", progress=lambda m: None)
    return {"base": base, "model": model, "report": report}


@pytest.mark.slow
def test_report_follows_the_schema(bench):
    out = bench["base"] / "report"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == SCHEMA
    assert {"cpu_model", "logical_cores", "mem_total_gib", "versions", "onnxruntime_providers", "gpus"} <= set(report["machine"])
    assert list(report["backends"]) == ["torch", "onnx-int8"]
    for name, r in report["backends"].items():
        for key in ("vision_s", "prefill_s", "decode_s"):
            assert set(r[key]) == STATS_KEYS, (name, key)
            assert 0 < r[key]["p10"] <= r[key]["median"] <= r[key]["p90"]
        assert r["vision_s"]["n"] == 2 * 2  # images x repeats, warm-up excluded
        assert r["decode_s"]["n"] == 2 * 2 * 4  # new_tokens - 1 decode steps each
        assert len(r["decode_by_position_ms"]) == 4
        assert r["tokens_per_s"] == pytest.approx(1 / r["decode_s"]["median"])
        assert r["size_bytes"] > 0 and r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
        assert r["load_s"] > 0
        assert {"top1_agreement", "mean_kl", "mean_cosine", "greedy_match_rate"} <= set(r["accuracy"])
    assert report["recommendation"]["backend"] in report["backends"]
    md = (out / "report.md").read_text()
    assert "| backend |" in md and "Recommended:" in md


@pytest.mark.slow
def test_plots_are_valid_pngs(bench):
    out = bench["base"] / "report"
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] > 200 and im.size[1] > 200


@pytest.mark.slow
def test_reference_agrees_with_itself(bench):
    ref = bench["report"]["backends"]["torch"]["accuracy"]
    assert ref["top1_agreement"] == 1.0 and ref["mean_kl"] == 0.0 and ref["greedy_match_rate"] == 1.0
    # the int8 export of the same weights is close to it (a real comparison, not the reference again)
    q = bench["report"]["backends"]["onnx-int8"]
    assert q["accuracy"]["mean_kl"] > 0 and q["accuracy"]["top1_agreement"] >= 0.9


def _zero_scales(export: Path) -> int:
    """Overwrite every quantization scale of an export with zeros, in its external data files."""
    zeroed = 0
    for graph in export.glob("*.onnx"):
        model = onnx.load(str(graph), load_external_data=False)
        for init in model.graph.initializer:
            if init.name.endswith(("scale", "scales")) and init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                with open(export / info["location"], "r+b") as f:
                    f.seek(int(info.get("offset", 0)))
                    f.write(b"\0" * int(info["length"]))
                zeroed += 1
    return zeroed


@pytest.mark.slow
def test_broken_quantized_export_is_reported_inaccurate(bench, tmp_path):
    good = next((bench["base"] / "cache").glob("*/onnx-int8"))
    broken = tmp_path / "broken-int8"
    shutil.copytree(good, broken)
    assert _zero_scales(broken) > 0
    report = run_bench(broken, None, images=2, new_tokens=5, repeats=1, out=tmp_path / "r", reference=bench["model"],
                       plots=False, progress=lambda m: None)
    r = report["backends"]["onnx-int8"]
    assert r["accurate"] is False and r["accuracy"]["top1_agreement"] < 0.5, r["accuracy"]
    assert any("top-1 agreement" in issue for issue in r["accuracy_issues"])
    assert report["recommendation"]["backend"] == "torch"
    assert "NO: top-1 agreement" in (tmp_path / "r" / "report.md").read_text()


def test_task_accuracy_gates_include_false_positives():
    """With --data, an int8 backend that draws boxes for absent objects more often than fp32 (or
    finds fewer present ones) misses the gates, and --compare flags a rising false-positive rate."""
    from pgexport.bench.report import judge

    ref = {"task_accuracy": {"exact_match": 0.97, "detect_iou": 0.9, "detect_recall": 0.98, "detect_fp_rate": 0.01}}
    same_time = {"median": 0.01, "p10": 0.01, "p90": 0.01}
    good = {"accuracy": {"top1_agreement": 0.999}, "task_accuracy": dict(ref["task_accuracy"]),
            **{key: same_time for key in ("vision_s", "prefill_s", "decode_s")}}
    assert judge("onnx-int8", good, ref) == []
    bad = copy.deepcopy(good)
    bad["task_accuracy"].update(detect_fp_rate=0.03, detect_recall=0.95)
    issues = judge("onnx-int8", bad, ref)
    assert len(issues) == 2 and any(i.startswith("detect_fp_rate 0.030") for i in issues), issues
    assert any(i.startswith("detect_recall 0.950") for i in issues), issues
    old, new = {"backends": {"onnx-int8": good}}, {"backends": {"onnx-int8": bad}}
    _, regressions = compare_reports(old, new)
    assert sorted(r.split(":")[0] for r in regressions) == ["onnx-int8 detect_fp_rate", "onnx-int8 detect_recall"]
    assert not compare_reports(new, old)[1]  # fewer false positives is no regression


@pytest.mark.slow
def test_compare_flags_an_injected_slowdown(bench, tmp_path):
    old = json.loads((bench["base"] / "report" / "report.json").read_text())
    rows, regressions = compare_reports(old, copy.deepcopy(old))
    assert rows and not regressions
    slow = copy.deepcopy(old)
    d = slow["backends"]["onnx-int8"]["decode_s"]
    width = d["p90"] - d["p10"]
    for k in ("median", "p10", "p90", "min", "max", "mean"):
        d[k] = d[k] + 3 * width + 0.5 * old["backends"]["onnx-int8"]["decode_s"]["median"]
    _, regressions = compare_reports(old, slow)
    assert len(regressions) == 1 and regressions[0].startswith("onnx-int8 decode")
    # a change inside the measured spread is not a regression
    noisy = copy.deepcopy(old)
    d = noisy["backends"]["torch"]["prefill_s"]
    d["median"] = d["median"] + 0.5 * (d["p90"] - d["p10"])
    assert not compare_reports(old, noisy)[1]
    # through the CLI: exit status 1 and the regression named
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(slow))
    res = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    assert res.exit_code == 1 and "onnx-int8 decode" in res.output
    res = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / "old.json"), str(tmp_path / "old.json")])
    assert res.exit_code == 0, res.output


def test_bad_options_give_one_line_errors(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--backends", "onnx-int3"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "onnx-int3" in res.output and "onnx-int4" in res.output
    (tmp_path / "x.json").write_text("{}")
    res = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")])
    assert res.exit_code == 1 and "not a `pgexport bench` report" in res.output
    res = CliRunner().invoke(main, ["bench", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "not found" in res.output


def test_quant_baselines_memory_targets_and_block_option():
    """benchmarks/bench_quant_baselines.py: the memory target covers the int4 job under its
    per-block folder name, skips reused folders, and --int4-block-size rejects invalid sizes."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_quant_baselines.py"
    spec = importlib.util.spec_from_file_location("bench_quant_baselines", path)
    bqb = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [str(path)]
    try:
        spec.loader.exec_module(bqb)
    finally:
        sys.argv = argv
    gib = 2**30
    jobs = {"onnx-int8": {"kind": "reused"}, "onnx-int4-b128": {"peak_rss": 6 * gib},
            "onnx-int4-b32": {"peak_rss": 1 * gib}, "torch-int8": {"peak_rss": 16 * gib}, "torch-int4": {"error": "boom"}}
    got = {t["job"]: t for t in bqb.quantization_targets(jobs, 10 * gib, 24 * gib, "onnx-int4-b128")}
    assert set(got) == {"onnx-int4-b128", "torch-int8", "torch-int4"}  # reused and other block sizes left out
    assert got["onnx-int4-b128"]["ratio"] == pytest.approx(0.6) and got["onnx-int4-b128"]["met"]
    assert got["torch-int8"]["ratio"] == pytest.approx(1.6) and not got["torch-int8"]["met"]  # over 1.5x
    assert not got["torch-int4"]["met"]
    with pytest.raises(SystemExit):
        bqb.main(["--int4-block-size", "48"])


@pytest.mark.slow
def test_decode_roofline_counts_the_weight_bytes(bench, tmp_path):
    """benchmarks/bench_decode_roofline.py: the bytes per token are the decode graph's matmul
    weights (read back from its data file) plus the KV cache attention reads, every kernel of
    every profiled step is counted once (the warm-up step left out), and the best case adds the
    other kernels' time to the roofline."""
    from onnx import numpy_helper

    from benchmarks.bench_decode_roofline import MATMUL_OPS, main as roofline

    folder = next(p.parent for p in (bench["base"] / "cache").rglob("decode.onnx") if "int8" in str(p))
    past, runs = 12, 3
    out = tmp_path / "r"
    assert roofline([str(folder), "--repeats", "2", "--past", str(past), "--profile-runs", str(runs),
                     "--bandwidth-gib", "0.05", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    graph = onnx.load(str(folder / "decode.onnx")).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = sum(arrays[i].nbytes for n in graph.node if n.op_type in MATMUL_OPS for i in n.input[1:] if i in arrays)
    kv = 0  # K and V of past + 1 positions, float32, for every layer
    for i in graph.input:
        if i.name.startswith("past_key_values."):
            dims = i.type.tensor_type.shape.dim
            kv += dims[1].dim_value * (past + 1) * dims[3].dim_value * 4
    got = result["folders"][folder.name]
    assert weights > 0 and got["weight_bytes_per_token"] == pytest.approx(weights, rel=1e-9)
    assert got["bytes_per_token"] == pytest.approx(weights + kv, rel=1e-9)
    calls = {op: row["calls"] for op, row in got["ops"].items()}
    assert calls["DynamicQuantizeMatMul"] == sum(n.op_type == "DynamicQuantizeMatMul" for n in graph.node)
    assert all(abs(c - round(c)) < 1e-9 for c in calls.values()), calls  # whole calls per step: no warm-up leaked
    assert got["best_case_ms"] >= got["roofline_ms"] > 0
    with pytest.raises(SystemExit):
        roofline([str(folder), str(folder)])  # the same name twice


@pytest.mark.slow
def test_pair_bench_compares_folders_pass_by_pass(bench, tmp_path):
    """benchmarks/bench_pair.py: one process, every folder timed each pass, paired ratios per part;
    a folder that is not an export is refused with a usage error."""
    from benchmarks.bench_pair import PARTS, main as pair

    folder = next(p.parent for p in (bench["base"] / "cache").rglob("decode.onnx") if "int8" in str(p))
    twin = tmp_path / "twin"
    shutil.copytree(folder, twin)
    out = tmp_path / "pair"
    assert pair([str(folder), str(twin), "--passes", "3", "--new-tokens", "3", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["folders"]) == {folder.name, "twin"}
    ratios = result["ratios"][f"{folder.name} / twin"]
    for part in PARTS:
        assert result["folders"]["twin"][part]["n"] == 3 and ratios[part]["n"] == 3 and ratios[part]["median"] > 0
    with pytest.raises(SystemExit):
        pair([str(tmp_path), str(twin)])  # not an export folder
    with pytest.raises(SystemExit):
        pair([str(folder), str(twin), "--new-tokens", "1"])


def test_matmul_kernel_bench_matches_the_float_product(tmp_path):
    """benchmarks/bench_matmul_kernels.py: every kernel/format it times computes A @ W within its
    quantization error (int8 tight, 4 bits looser), so its timings are of working layers."""
    from benchmarks.bench_matmul_kernels import main as kernels

    out = tmp_path / "k"
    assert kernels(["--rows", "3", "--k", "128", "--n", "48", "--blocks", "16,32", "--repeats", "2", "--out", str(out)]) == 0
    variants = json.loads(out.with_suffix(".json").read_text())["variants"]
    assert len(variants) == 3 + 2 * 2 + 2 + 1  # dynamic sym/asym and rowwise; int4 x 2 blocks x 2; int8 x 2; acc0
    for name, v in variants.items():
        limit = 0.2 if "4-bit" in name else 0.03
        assert 0 < v["max_rel_error"] < limit, (name, v["max_rel_error"])
