"""Detection boxes: encode/parse round trip and drawing."""

import numpy as np
import pytest
from PIL import Image

from pgexport.processing.detection import Detection, draw_detections, encode_box, parse_detections
from pgexport.processing.tokenizer import build_paligemma_tokenizer

WIDTH, HEIGHT = 640, 480


def random_boxes(count, seed=0):
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        x0, x1 = sorted(rng.uniform(0, WIDTH, 2))
        y0, y1 = sorted(rng.uniform(0, HEIGHT, 2))
        boxes.append((x0, y0, x1, y1))
    return boxes


LABELS = ["cat", "red star", "traffic light", "dog"]


def model_output(boxes, labels):
    return " ; ".join(f"{encode_box(box, WIDTH, HEIGHT)} {label}" for box, label in zip(boxes, labels))


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_within_one_bin(seed):
    boxes = random_boxes(len(LABELS), seed) + [(0, 0, WIDTH, HEIGHT)]
    labels = LABELS + ["everything"]
    detections = parse_detections(model_output(boxes, labels), WIDTH, HEIGHT)
    assert [d.label for d in detections] == labels
    for det, box in zip(detections, boxes):
        bin_px = np.array([WIDTH, HEIGHT, WIDTH, HEIGHT]) / 1023
        assert np.all(np.abs(np.array(det.box) - box) <= bin_px / 2 + 1e-9)
        ymin, xmin, ymax, xmax = det.normalized
        assert np.allclose((xmin * WIDTH, ymin * HEIGHT, xmax * WIDTH, ymax * HEIGHT), det.box)
        assert all(0 <= v <= 1 for v in det.normalized)


def test_round_trip_through_the_tokenizer():
    """Decoded model output (skip_special_tokens=True) still parses: loc tokens survive decoding."""
    tok = build_paligemma_tokenizer(512)
    boxes = random_boxes(3, seed=9)
    text = model_output(boxes, LABELS[:3])
    ids = tok.encode("<image><bos>detect cat ; red star ; traffic light\n" + text + "<eos>",
                     add_special_tokens=False).ids
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert [d.box for d in parse_detections(decoded, WIDTH, HEIGHT)] == \
        [d.box for d in parse_detections(text, WIDTH, HEIGHT)]


def test_encode_clamps_and_orders_y_first():
    assert encode_box((-5, 10, WIDTH + 50, HEIGHT), WIDTH, HEIGHT) == (
        f"<loc{round(10 / HEIGHT * 1023):04d}><loc0000><loc1023><loc1023>")


def test_parse_ignores_noise_and_segmentation_tokens():
    text = ("detect cat\n<loc0001><loc0002><loc0003> broken ; "
            "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat ;")
    detections = parse_detections(text, 1023, 1023)
    assert detections == [Detection("cat", (200.0, 100.0, 400.0, 300.0), (100 / 1023, 200 / 1023, 300 / 1023, 400 / 1023))]
    assert parse_detections("no objects here", WIDTH, HEIGHT) == []


def test_draw_changes_the_outline_only():
    image = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
    box = (100.0, 150.0, 400.0, 350.0)
    drawn = draw_detections(image, [Detection("cat", box, (0, 0, 0, 0))])
    before, after = np.asarray(image), np.asarray(drawn)
    assert drawn.size == image.size and before.min() == before.max() == 128  # input untouched
    x0, y0, x1, y1 = map(int, box)
    for x, y in [(x0, 250), (x1, 250), (250, y1), ((x0 + x1) // 2, y1)]:  # points on the outline
        assert (after[y, x] != before[y, x]).any()
    assert np.array_equal(after[y0 + 20: y1 - 20, x0 + 20: x1 - 20], before[y0 + 20: y1 - 20, x0 + 20: x1 - 20])
    assert np.array_equal(after[y1 + 10:, :], before[y1 + 10:, :])  # below the box: unchanged
    assert (after[y0 - 15: y0, x0: x0 + 20] != 128).any()  # the label tab above the box
