"""Synthetic "shapes" dataset in PaliGemma's prefix/suffix format (Pillow + NumPy, no torch).

Each image shows 1-3 filled shapes (circle, square, triangle, diamond) in six colours on a plain
mid-grey background. The image is divided into a 3 x 3 grid and every shape sits inside its own
cell (random size and offset within the cell), so shapes never overlap and "where is ...?" has
one answer. From each image come PaliGemma-style tasks:

    caption en                              a red circle and a blue square
    answer en what color is the circle?     red
    answer en how many shapes are there?    two          (also "how many circles are there?")
    answer en where is the red circle?      top left     (one of 9 grid cells)
    detect circle                           <loc0012><loc0034><loc0300><loc0321> circle ; ...
    detect triangle                         (empty: no triangle in the image)

Every image asks to detect a shape it holds; about a third also ask for one it does not hold,
answered as PaliGemma answers a detection prompt for an absent object: with nothing (the
empty suffix, then `<eos>`), so a quarter of the detect examples teach the model not to draw a
box. Questions ask the colour or position only of shapes that are there. Objects are listed in reading order (grid rows top to bottom, then left to right) in captions
and detections, so every target is unique. Boxes use `pgexport.processing.detection.encode_box`, the
format `parse_detections` reads.

Everything is a pure function of the seed: `write_dataset(out, seed=0)` writes
`train.jsonl`, `val.jsonl`, `test.jsonl` (one `{"image", "prefix", "suffix", "task"}` object a
line, `image` relative to the JSONL file) and `images/*.png`. Each split draws from its own
random stream (seed, split), and a generated scene that repeats one of an earlier split is
skipped, so the splits never share an image.

    >>> records = list(make_examples(seed=0, num_images=2))
    >>> sorted({r.task for r in records}) == sorted(TASKS)
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from pgexport.errors import PgExportError
from pgexport.processing.detection import encode_box, parse_detections
from pgexport.processing.image import load_image

IMAGE_SIZE = 224  # rendered side in pixels (a model resizes it to its own input size)
GRID = 3  # 3 x 3 cells, one shape per cell at most
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 200, 0), "purple": (140, 50, 180), "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("zero", "one", "two", "three")
CELL_NAMES = (("top left", "top", "top right"), ("left", "center", "right"),
              ("bottom left", "bottom", "bottom right"))
SIDE = (0.70, 0.95)  # a shape's side as a fraction of its grid cell's
TASKS = ("caption", "color", "count", "position", "detect")
SPLITS = ("train", "val", "test")
ABSENT_DETECT = 0.35  # chance that an image also asks to detect an absent shape (0.35 / 1.35 = 26% of detect examples)


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col) in the 3 x 3 grid
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, exclusive right/bottom


@dataclass
class Scene:
    shapes: list[Shape]  # in reading order
    background: tuple[int, int, int]
    size: int = IMAGE_SIZE

    def key(self) -> str:
        """Identity of the scene (same key = same image)."""
        return repr((self.size, self.background, [(s.shape, s.colour, s.box) for s in self.shapes]))


@dataclass
class Example:
    image: str  # path relative to the JSONL file (or absolute)
    prefix: str
    suffix: str
    task: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"image": self.image, "prefix": self.prefix, "suffix": self.suffix, "task": self.task})


# ---------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """1-3 shapes in distinct grid cells, random shape/colour/size/offset, plain grey background."""
    n = int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))  # reading order
    cell_px = size / GRID
    shapes = []
    for c in cells:
        row, col = divmod(c, GRID)
        side = int(rng.integers(int(cell_px * SIDE[0]), int(cell_px * SIDE[1]) + 1))  # 52..70 px at 224
        margin = 3
        lo_x, lo_y = int(col * cell_px) + margin, int(row * cell_px) + margin
        hi_x, hi_y = int((col + 1) * cell_px) - margin - side, int((row + 1) * cell_px) - margin - side
        x0, y0 = int(rng.integers(lo_x, max(lo_x, hi_x) + 1)), int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
        shapes.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
                            (row, col), (x0, y0, x0 + side, y0 + side)))
    grey = int(rng.integers(90, 171))  # mid grey: the shapes, not the background, dominate the patch embeddings
    return Scene(shapes, (grey, grey, grey), size)


def render(scene: Scene) -> Image.Image:
    """Draw a scene (RGB). Every shape touches all four sides of its box."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        # Pillow's outlines include the last pixel: draw to x1 - 1 so the box is [x0, x1).
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        elif s.shape == "diamond":
            cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    return image


def cell_pooling(patches_per_side: int) -> np.ndarray:
    """`[GRID * GRID, patches_per_side ** 2]` float32: row c averages the patches whose centre
    lies in grid cell c (reading order), so `pool @ tokens` gives one feature per cell."""
    pool = np.zeros((GRID * GRID, patches_per_side ** 2), np.float32)
    for r in range(patches_per_side):
        for c in range(patches_per_side):
            cell = int((r + 0.5) / patches_per_side * GRID) * GRID + int((c + 0.5) / patches_per_side * GRID)
            pool[cell, r * patches_per_side + c] = 1
    return pool / pool.sum(1, keepdims=True)


def cell_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """What each grid cell of each scene holds: "shape" and "colour" `[N, GRID * GRID]` int64
    (0 = empty, else 1 + the index in SHAPES / COLOURS) and "box" `[N, GRID * GRID, 4]` float32
    (x0, y0, x1, y1 as fractions of the image; zeros where empty). Targets for vision probes."""
    shape = np.zeros((len(scenes), GRID * GRID), np.int64)
    colour = np.zeros_like(shape)
    box = np.zeros((len(scenes), GRID * GRID, 4), np.float32)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            cell = s.cell[0] * GRID + s.cell[1]
            shape[i, cell] = 1 + SHAPES.index(s.shape)
            colour[i, cell] = 1 + list(COLOURS).index(s.colour)
            box[i, cell] = np.asarray(s.box, np.float32) / scene.size
    return {"shape": shape, "colour": colour, "box": box}


# ---------------------------------------------------------------------------- tasks
def _plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    """"an" before a vowel sound ("an orange"), else "a" (every colour name here starts as spelt)."""
    return "an" if word[:1] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """"a red circle", "a red circle and an orange square", "a red circle, a blue square and a ..."."""
    parts = [f"{article(s.colour)} {s.colour} {s.shape}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detection_target(scene: Scene, shape: str) -> str:
    """Every `shape` of the scene in reading order, " ; "-separated; "" when there is none."""
    return " ; ".join(f"{encode_box(s.box, scene.size, scene.size)} {s.shape}" for s in scene.shapes if s.shape == shape)


def scene_tasks(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(task, prefix, suffix) for one scene: a caption, one question of each kind, one detection
    of a present shape and, with probability ABSENT_DETECT, one of an absent shape (suffix "")."""
    shapes = scene.shapes
    out = [("caption", "caption en", caption(scene))]
    # colour: of a shape that occurs once
    unique_shapes = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
    if unique_shapes:
        s = unique_shapes[int(rng.integers(len(unique_shapes)))]
        out.append(("color", f"answer en what color is the {s.shape}?", s.colour))
    # count: all shapes, or one kind (which may be absent: "zero")
    if rng.random() < 0.5:
        out.append(("count", "answer en how many shapes are there?", NUMBERS[len(shapes)]))
    else:  # a kind that is present half the time, so "zero" is not a shortcut answer
        kind = shapes[int(rng.integers(len(shapes)))].shape if rng.random() < 0.5 else SHAPES[int(rng.integers(len(SHAPES)))]
        out.append(("count", f"answer en how many {_plural(kind)} are there?", NUMBERS[sum(s.shape == kind for s in shapes)]))
    # position: of a (colour, shape) that occurs once
    unique = [s for s in shapes if sum((t.colour, t.shape) == (s.colour, s.shape) for t in shapes) == 1]
    if unique:
        s = unique[int(rng.integers(len(unique)))]
        out.append(("position", f"answer en where is the {s.colour} {s.shape}?", CELL_NAMES[s.cell[0]][s.cell[1]]))
    # detect: a shape that is present (every instance, reading order)
    kind = shapes[int(rng.integers(len(shapes)))].shape
    out.append(("detect", f"detect {kind}", detection_target(scene, kind)))
    # detect: a shape that is absent (at most 3 of the 4 kinds are present, so one always is)
    if rng.random() < ABSENT_DETECT:
        absent = [k for k in SHAPES if all(s.shape != k for s in shapes)]
        kind = absent[int(rng.integers(len(absent)))]
        out.append(("detect", f"detect {kind}", detection_target(scene, kind)))
    return out


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split) if split in SPLITS else 99])


def make_examples(seed: int, num_images: int, split: str = "train", exclude: set[str] | None = None,
                  size: int = IMAGE_SIZE) -> Iterator[tuple[Scene, list[tuple[str, str, str]]]]:
    """Yield (scene, tasks) for `num_images` scenes of one split; scenes in `exclude` are skipped
    (and the keys of the yielded scenes are added to it)."""
    rng = _split_rng(seed, split)
    exclude = set() if exclude is None else exclude
    made = 0
    while made < num_images:
        scene = random_scene(rng, size)
        key = scene.key()
        if key in exclude:
            continue
        exclude.add(key)
        made += 1
        yield scene, scene_tasks(scene, rng)


# ---------------------------------------------------------------------------- files
def write_dataset(out: str | Path, seed: int = 0, train: int = 2000, val: int = 100, test: int = 200,
                  size: int = IMAGE_SIZE, progress=None) -> dict[str, Path]:
    """Write `images/` and `{train,val,test}.jsonl` under `out`; `train`/`val`/`test` count images
    (each gives 3-5 examples, mostly 5). Returns the JSONL paths. Deterministic from `seed`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PgExportError(f"{out} exists and is not empty; choose another --out or remove it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:
            for i, (scene, tasks) in enumerate(make_examples(seed, n, split, seen, size)):
                rel = f"images/{split}_{i:06d}.png"
                render(scene).save(out / rel, optimize=False)
                for task, prefix, suffix in tasks:
                    f.write(Example(rel, prefix, suffix, task).to_json() + "\n")
        paths[split] = path
        if progress:
            progress(f"{split}: {n} images -> {path}")
    (out / "README.txt").write_text(
        f"pgexport synthetic shapes dataset, seed {seed}, images {size}x{size}.\n"
        "Each line of {train,val,test}.jsonl: {image, prefix, suffix, task}; image paths are relative to this folder.\n")
    return paths


def read_jsonl(path: str | Path, check_images: bool = False) -> list[Example]:
    """Read `{image, prefix, suffix[, task]}` lines; image paths are made absolute (relative to the file).

    Every line must be a JSON object whose `image`, `prefix` and `suffix` (and `task`, if given)
    are strings; the first line that is not fails with a one-line `PgExportError` naming
    `path:line`. With `check_images`, every distinct image is also opened and decoded (as
    training loads it, `load_image`), so a missing or corrupt file fails here, with the line of
    its first record, rather than part way through training."""
    path = Path(path)
    if not path.is_file():
        raise PgExportError(f"data file {path} not found; create one with `pgexport dataset --out DIR` or pass a JSONL file")
    records = []
    checked: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise PgExportError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); fix the line") from None
            if not isinstance(d, dict):
                raise PgExportError(f"{where} is not a JSON object with image, prefix and suffix; fix the line")
            missing = [k for k in ("image", "prefix", "suffix") if k not in d]
            if missing:
                raise PgExportError(f"{where} has no {', '.join(missing)}; every line needs image, prefix and suffix")
            wrong = [k for k in ("image", "prefix", "suffix", "task") if k in d and not isinstance(d[k], str)]
            if wrong or not d["image"]:
                what = f"{', '.join(wrong)} not a string" if wrong else "image is empty"
                raise PgExportError(f"{where}: {what}; image, prefix, suffix and task are strings")
            image = d["image"]
            full = image if os.path.isabs(image) else str(path.parent / image)
            if check_images and full not in checked:
                try:
                    load_image(full)
                except PgExportError as e:
                    raise PgExportError(f"{where}: {e}") from None
                checked.add(full)
            records.append(Example(full, d["prefix"], d["suffix"], d.get("task") or task_of(d["prefix"])))
    if not records:
        raise PgExportError(f"{path} holds no examples")
    return records


def task_of(prefix: str) -> str:
    """Task name from a prefix when the JSONL has none: 'detect', 'caption' or 'answer'."""
    return prefix.split(" ", 1)[0] if prefix.split(" ", 1)[0] in ("detect", "caption", "segment", "ocr") else "answer"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- metrics
def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


IOU_HIT = 0.5  # a predicted box finds a target box at this IoU or more (recall; the COCO/VOC threshold)


def matched_ious(predicted: str, target: str, width: int = 1, height: int = 1) -> tuple[list[float], int, int]:
    """Boxes of one detection answer matched to the target's greedily by IoU (labels must agree):
    (IoUs of the matched pairs, number predicted, number in the target)."""
    pred = parse_detections(predicted, width, height)
    gold = parse_detections(target, width, height)
    pairs = sorted(((box_iou(p.box, g.box), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)
                    if p.label == g.label), reverse=True)
    used_p, used_g, ious = set(), set(), []
    for iou, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            ious.append(iou)
    return ious, len(pred), len(gold)


def detection_iou(predicted: str, target: str, width: int = 1, height: int = 1) -> float:
    """Mean IoU of one detection answer: boxes matched greedily by IoU (labels must agree);
    the sum of matched IoUs is divided by max(#predicted, #target), so missing and extra boxes
    both count as 0. Both empty (nothing there, nothing found) is 1."""
    ious, n_pred, n_gold = matched_ious(predicted, target, width, height)
    return sum(ious) / max(n_pred, n_gold) if n_pred or n_gold else 1.0


def score(task: str, predicted: str, target: str) -> float:
    """Detection IoU for `detect` tasks, exact match (after stripping) for the others."""
    if task == "detect":
        return detection_iou(predicted, target)
    return float(predicted.strip() == target.strip())


def task_metrics(pairs) -> tuple[dict, dict]:
    """Score (record, predicted text) pairs: (metrics, counts).

    metrics: exact match per question/caption task and their mean "exact_match"; for detect
    prompts whose target holds boxes, "detect" = "detect_iou" (mean `detection_iou`) and
    "detect_recall" (target boxes found at IoU >= IOU_HIT with the right label); for detect
    prompts whose target is empty (the shape is absent), "detect_fp_rate" (answers holding at
    least one box). A metric with no example is left out. counts: examples per task, with the
    absent-shape prompts as "detect_absent"."""
    by_task: dict[str, list[float]] = {}
    found = boxes = false_positives = absent = 0
    for r, text in pairs:
        if r.task == "detect" and not parse_detections(r.suffix, 1, 1):
            absent += 1
            false_positives += bool(parse_detections(text, 1, 1))
            continue
        by_task.setdefault(r.task, []).append(score(r.task, text, r.suffix))
        if r.task == "detect":
            ious, _, n_gold = matched_ious(text, r.suffix)
            found += sum(iou >= IOU_HIT for iou in ious)
            boxes += n_gold
    metrics = {task: float(np.mean(v)) for task, v in sorted(by_task.items())}
    em = [s for t, v in by_task.items() if t != "detect" for s in v]
    if em:
        metrics["exact_match"] = float(np.mean(em))
    if "detect" in by_task:
        metrics["detect_iou"] = metrics["detect"]
        metrics["detect_recall"] = found / boxes
    if absent:
        metrics["detect_fp_rate"] = false_positives / absent
    counts = {task: len(v) for task, v in sorted(by_task.items())}
    if absent:
        counts["detect_absent"] = absent
    return metrics, counts
