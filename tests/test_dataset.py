"""Synthetic shapes dataset: determinism, task format, split separation, metrics."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from pgexport.cli import main
from pgexport.train.dataset import (CELL_NAMES, COLOURS, NUMBERS, SHAPES, TASKS, caption, detection_iou, file_digest,
                              make_examples, read_jsonl, render, score, write_dataset)
from pgexport.processing.detection import parse_detections
from pgexport.errors import PgExportError


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = _files(write_dataset(tmp_path / "a", seed=3, train=12, val=3, test=4)["train"].parent)
    b = _files(write_dataset(tmp_path / "b", seed=3, train=12, val=3, test=4)["train"].parent)
    c = _files(write_dataset(tmp_path / "c", seed=4, train=12, val=3, test=4)["train"].parent)
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    assert {k for k in a if k.startswith("images/")} == {f"images/{s}_{i:06d}.png" for s, n in
                                                          (("train", 12), ("val", 3), ("test", 4)) for i in range(n)}


def test_splits_and_seeds_share_no_image(tmp_path):
    write_dataset(tmp_path / "a", seed=0, train=150, val=20, test=30)
    write_dataset(tmp_path / "b", seed=1, train=0, val=0, test=60)
    digests = {}
    for folder, split in ((tmp_path / "a", "train"), (tmp_path / "a", "val"), (tmp_path / "a", "test"), (tmp_path / "b", "test")):
        digests[(folder.name, split)] = {file_digest(r.image) for r in read_jsonl(folder / f"{split}.jsonl")}
    keys = list(digests)
    for i, k in enumerate(keys):
        for j in keys[i + 1:]:
            assert not digests[k] & digests[j], (k, j)


def test_tasks_are_consistent_with_the_scene():
    seen = set()
    for scene, tasks in make_examples(seed=0, num_images=200):
        shapes = scene.shapes
        assert 1 <= len(shapes) <= 3
        # shapes in distinct cells, inside the image, listed in reading order
        assert [s.cell for s in shapes] == sorted({s.cell for s in shapes})
        for s in shapes:
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= scene.size and 0 <= y0 < y1 <= scene.size
            cell = scene.size / 3
            assert int(x0 // cell) == s.cell[1] == int((x1 - 1) // cell)
            assert int(y0 // cell) == s.cell[0] == int((y1 - 1) // cell)
        for task, prefix, suffix in tasks:
            seen.add(task)
            if task == "caption":
                assert prefix == "caption en" and suffix == caption(scene)
                assert suffix.count(" and ") == (len(shapes) > 1)
            elif task == "color":
                shape = re.fullmatch(r"answer en what color is the (\w+)\?", prefix).group(1)
                assert [s.colour for s in shapes if s.shape == shape] == [suffix]
            elif task == "count":
                m = re.fullmatch(r"answer en how many (\w+)s are there\?", prefix)
                n = len(shapes) if m.group(1) == "shape" else sum(s.shape == m.group(1) for s in shapes)
                assert suffix == NUMBERS[n]
            elif task == "position":
                colour, shape = re.fullmatch(r"answer en where is the (\w+) (\w+)\?", prefix).groups()
                (s,) = [s for s in shapes if (s.colour, s.shape) == (colour, shape)]
                assert suffix == CELL_NAMES[s.cell[0]][s.cell[1]]
            elif task == "detect":
                shape = prefix.removeprefix("detect ")
                dets = parse_detections(suffix, scene.size, scene.size)
                want = [s for s in shapes if s.shape == shape]
                assert [d.label for d in dets] == [shape] * len(want)
                assert want or suffix == ""  # an absent shape: the empty answer
                for d, s in zip(dets, want):  # encode_box round trip: within half a bin
                    assert np.allclose(d.box, s.box, atol=scene.size / 1023 / 2 + 1e-9)
            else:
                raise AssertionError(task)
    assert seen == set(TASKS)


def test_detect_prompts_for_absent_shapes():
    """A quarter of the detect prompts ask for a shape the image does not hold; their target is
    the empty answer (no box, then <eos>), as PaliGemma answers. Every image still asks for one
    shape it holds, and colour/position questions only ask about shapes that are there."""
    present, absent = [], []
    for scene, tasks in make_examples(seed=3, num_images=2000):
        kinds = {s.shape for s in scene.shapes}
        detects = [(prefix.removeprefix("detect "), suffix) for task, prefix, suffix in tasks if task == "detect"]
        assert sum(shape in kinds for shape, _ in detects) == 1  # one prompt for a present shape per image
        for shape, suffix in detects:
            (present if shape in kinds else absent).append(suffix)
        for task, prefix, suffix in tasks:
            if task in ("color", "position"):
                assert prefix.removesuffix("?").split()[-1] in kinds, prefix
    assert 0.2 <= len(absent) / (len(absent) + len(present)) <= 0.3
    assert set(absent) == {""} and all(parse_detections(t, 224, 224) for t in present)
    assert parse_detections("", 224, 224) == []


def test_captions_use_the_right_article():
    captions = [suffix for _, tasks in make_examples(seed=3, num_images=500) for task, _, suffix in tasks
                if task == "caption"]
    text = " ".join(captions)
    assert "an orange" in text and "a orange" not in text
    assert all(f"an {c}" not in text for c in COLOURS if c != "orange")  # "a red", never "an red"
    assert sum(f"a {c}" in text for c in COLOURS) == len(COLOURS) - 1


def test_task_metrics_false_positives_and_recall():
    """detect prompts with an empty target count towards the false-positive rate (any box is one)
    and not towards IoU; recall counts target boxes found at IoU >= 0.5 with the right label."""
    from pgexport.train.dataset import Example, task_metrics

    a = "<loc0000><loc0000><loc0511><loc0511> circle"
    b = "<loc0512><loc0512><loc1023><loc1023> circle"
    half = "<loc0000><loc0000><loc0255><loc0511> circle"  # IoU 0.5 with a (within a bin)
    rows = [("detect", f"{a} ; {b}", a), ("detect", a, half), ("detect", "", ""), ("detect", "", b),
            ("detect", "", ""), ("count", "two", "two"), ("count", "one", "two")]
    metrics, counts = task_metrics((Example("x.png", "p", target, task), text) for task, target, text in rows)
    assert counts == {"count": 2, "detect": 2, "detect_absent": 3}
    assert metrics["detect_fp_rate"] == pytest.approx(1 / 3)
    assert metrics["detect_iou"] == pytest.approx((0.5 + detection_iou(half, a)) / 2)
    assert metrics["detect_recall"] == pytest.approx(1 / 3)  # a found; b missed; half is just under 0.5
    assert metrics["exact_match"] == 0.5 and metrics["count"] == 0.5
    assert detection_iou("", "") == 1.0 and detection_iou(a, "") == 0.0


def test_count_questions_are_not_mostly_zero():
    """"how many <kind>s?" asks about a present kind half the time, so answering "zero" is no
    shortcut (uniform kinds would make it the answer 58% of the time)."""
    answers = [suffix for _, tasks in make_examples(seed=3, num_images=2000) for task, prefix, suffix in tasks
               if task == "count" and "shapes" not in prefix]
    assert len(answers) > 800
    assert 0.2 < answers.count("zero") / len(answers) < 0.4


def test_cell_pooling_and_labels():
    from pgexport.train.dataset import GRID, SHAPES, cell_labels, cell_pooling

    pool = cell_pooling(8)  # the demo's 8 x 8 patches
    assert pool.shape == (GRID * GRID, 64) and np.allclose(pool.sum(1), 1)
    assert ((pool > 0).sum(0) == 1).all()  # every patch in exactly one cell
    assert (pool[0].reshape(8, 8)[:3, :3] > 0).all() and pool[0].reshape(8, 8)[3:].sum() == 0  # top-left cell
    scenes = [scene for scene, _ in make_examples(seed=5, num_images=20)]
    labels = cell_labels(scenes)
    for i, scene in enumerate(scenes):
        assert (labels["shape"][i] > 0).sum() == len(scene.shapes)
        for s in scene.shapes:
            cell = s.cell[0] * GRID + s.cell[1]
            assert SHAPES[labels["shape"][i, cell] - 1] == s.shape
            assert np.allclose(labels["box"][i, cell] * scene.size, s.box)


def test_render_draws_each_shape_in_its_box():
    for scene, _ in make_examples(seed=5, num_images=20):
        pixels = np.asarray(render(scene)).astype(int)
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            colour = np.array(COLOURS[s.colour])
            hit = (np.abs(pixels - colour).sum(-1) == 0)
            ys, xs = np.nonzero(hit[y0:y1, x0:x1])
            # the shape reaches (within a pixel) every side of its box and nothing outside
            assert xs.min() <= 1 and ys.min() <= 1 and xs.max() >= x1 - x0 - 2 and ys.max() >= y1 - y0 - 2
        assert set(s.shape for s in scene.shapes) <= set(SHAPES)


def test_detection_iou_and_score():
    a = "<loc0000><loc0000><loc0511><loc0511> circle"
    b = "<loc0512><loc0512><loc1023><loc1023> circle"
    assert detection_iou(a, a) == 1.0
    assert detection_iou(f"{b} ; {a}", f"{a} ; {b}") == 1.0  # order does not matter
    assert detection_iou(a, f"{a} ; {b}") == 0.5  # a missing box counts 0
    assert detection_iou(f"{a} ; {b}", a) == 0.5  # an extra box too
    assert detection_iou(a.replace("circle", "square"), a) == 0.0  # the label must agree
    half = "<loc0000><loc0000><loc0511><loc1023> circle"
    assert detection_iou(half, a) == pytest.approx(0.5, abs=1e-3)
    assert score("count", " two ", "two") == 1.0 and score("count", "three", "two") == 0.0


def test_read_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "prefix": "caption en"}\n')
    with pytest.raises(PgExportError, match=r"bad.jsonl:1 .*suffix"):
        read_jsonl(bad)
    with pytest.raises(PgExportError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    for line, message in [('["x.png", "caption en", "a"]', "not a JSON object"),
                          ('{"image": "x.png", "prefix": "caption en", "suffix": 3}', "suffix not a string"),
                          ('{"image": "", "prefix": "caption en", "suffix": "a"}', "image is empty"),
                          ('{"image": "x.png", "prefix": "caption en", "suffix": "a"', "not valid JSON")]:
        bad.write_text('{"image": "x.png", "prefix": "caption en", "suffix": "a"}\n\n' + line + "\n")
        with pytest.raises(PgExportError, match=re.escape(f"{bad}:3")) as info:
            read_jsonl(bad)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_read_jsonl_checks_images_on_request(tmp_path):
    """Paths are resolved against the JSONL file; with check_images every distinct image is
    decoded and the first bad one is reported with the line of its first record."""
    render(next(make_examples(seed=0, num_images=1))[0]).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    data = tmp_path / "d.jsonl"
    rows = [("ok.png", "caption en"), ("ok.png", "detect circle"), ("missing.png", "caption en"), ("empty.png", "caption en")]
    data.write_text("".join(json.dumps({"image": i, "prefix": p, "suffix": "a"}) + "\n" for i, p in rows))
    records = read_jsonl(data)  # without the check, only the lines are read
    assert [r.image for r in records] == [str(tmp_path / i) for i, _ in rows]
    assert [r.task for r in records] == ["caption", "detect", "caption", "caption"]
    with pytest.raises(PgExportError, match=re.escape(f"{data}:3: image file not found")):
        read_jsonl(data, check_images=True)
    data.write_text("".join(json.dumps({"image": i, "prefix": p, "suffix": "a"}) + "\n" for i, p in rows[:2] + rows[3:]))
    with pytest.raises(PgExportError, match=re.escape(f"{data}:3: ")):
        read_jsonl(data, check_images=True)
    data.write_text("".join(json.dumps({"image": i, "prefix": p, "suffix": "a"}) + "\n" for i, p in rows[:2]))
    assert len(read_jsonl(data, check_images=True)) == 2


def test_cli_dataset(tmp_path):
    out = tmp_path / "shapes"
    r = CliRunner().invoke(main, ["dataset", "--out", str(out), "--seed", "2", "--train", "5", "--val", "2", "--test", "2"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(lines) >= 5 * 4 and {"image", "prefix", "suffix", "task"} <= set(lines[0])
    assert (out / lines[0]["image"]).is_file()
    r = CliRunner().invoke(main, ["dataset", "--out", str(out)])  # not empty: refused, one line
    assert r.exit_code == 1 and "not empty" in r.output
