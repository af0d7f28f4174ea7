"""The project's accuracy gates for int8 and int4 exports, applied to the trained demo model
(`pgexport/assets/demo`) on 500 generated test images: task accuracy lost against the eager fp32
model and teacher-forced top-1 agreement with it. Kept apart from tests/test_quantize.py (which
checks the quantizer on small random models) because it takes minutes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import pgexport  # noqa: E402
from pgexport.bench.report import ACCURACY_GATES  # noqa: E402
from pgexport.exporters.pipeline import export_folder  # noqa: E402
from pgexport.models.generate import EagerStepper  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402

# Gates on the trained demo model (pgexport/assets/demo, if present): the project's accuracy gates
# (pgexport.bench.report.ACCURACY_GATES, which `pgexport bench` applies too): task accuracy lost
# against the eager fp32 model (exact match of the caption / question tasks, detection IoU and
# recall, in points) and teacher-forced top-1 agreement with fp32 over every gold answer token, on
# the 500-image test set of pgexport/train/evaluate.py (DEMO_EVAL_*; why 500: docs/quantization.md).
# Detection is also gated on the false-positive rate of detect prompts for absent shapes (gained,
# and at most DEMO_MAX_FP_RATE outright).
DEMO_GATES = {q: {"max_loss": g["max_task_drop"], "min_top1": g["min_top1"]}
              for q, g in ACCURACY_GATES.items() if q in ("int8", "int4")}
DEMO_MAX_FP_RATE = 0.02


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pgexport.train.dataset import read_jsonl, write_dataset
    from pgexport.train.demo import DEMO_DIR
    from pgexport.train.evaluate import DEMO_EVAL_IMAGES, DEMO_EVAL_SEED, teacher_forced_logits
    from pgexport.train.finetune import evaluate

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not built (python examples/train_demo.py)")
    data = tmp_path_factory.mktemp("demo-test")
    write_dataset(data, seed=DEMO_EVAL_SEED, train=0, val=0, test=DEMO_EVAL_IMAGES)
    records = read_jsonl(data / "test.jsonl")
    model = pgexport.load_model(str(DEMO_DIR), dtype="float32")
    processor = pgexport.load_processor(str(DEMO_DIR))
    eager = evaluate(model, processor, records, batch_size=64, max_new_tokens=40)
    # The fp32 side of the teacher-forced comparison, once for both quantizations.
    reference = teacher_forced_logits(EagerStepper(model), processor, records, model.cfg.eos_token_id,
                                      model.cfg.pad_token_id)
    return DEMO_DIR, model, processor, records, eager, reference


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_demo_model_accuracy_gates(demo, quant, tmp_path, record_diff):
    from pgexport.train.evaluate import task_accuracy, teacher_forced_agreement

    demo_dir, model, processor, records, eager, reference = demo
    out = tmp_path / quant
    result = export_folder(str(demo_dir), out, quant=quant, progress=None, threads=2)
    assert result["report"]["passed"], result["report"]["failures"]
    rt = OnnxPaliGemma(out, threads=2)
    got = task_accuracy(rt, records)
    tf = teacher_forced_agreement(EagerStepper(model), rt.stepper(), processor, records, model.cfg.eos_token_id,
                                  model.cfg.pad_token_id, reference=reference)
    rt.close()
    gates = DEMO_GATES[quant]
    record_diff(f"demo {quant} 1 - TF top1", 1 - tf["top1_agreement"])
    assert tf["top1_agreement"] >= gates["min_top1"], tf
    for metric in ("exact_match", "detect_iou", "detect_recall"):
        loss = eager[metric] - got[metric]
        record_diff(f"demo {quant} {metric} loss", loss)
        assert loss <= gates["max_loss"], (metric, eager, got)
    record_diff(f"demo {quant} detect_fp_rate gain", got["detect_fp_rate"] - eager["detect_fp_rate"])
    assert got["detect_fp_rate"] - eager["detect_fp_rate"] <= gates["max_loss"], (eager, got)
    if "detect_fp_rate" in json.loads((demo_dir / "training.json").read_text())["test_metrics"]:
        # a model trained with absent-shape prompts (an older one never learnt to answer with no box)
        assert got["detect_fp_rate"] <= DEMO_MAX_FP_RATE and eager["detect_fp_rate"] <= DEMO_MAX_FP_RATE, (eager, got)

