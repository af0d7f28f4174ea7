"""PaliGemma detection output: parse `<locNNNN>` boxes, encode boxes, draw them.

For `detect cat ; dog` the model answers one object after another, separated by " ; ", each
as four location tokens (ymin, xmin, ymax, xmax) followed by its label:

    >>> text = "<loc0000><loc0000><loc0511><loc1023> cat ; <loc0512><loc0000><loc1023><loc1023> dog"
    >>> [(d.label, [round(v) for v in d.box]) for d in parse_detections(text, 640, 480)]
    [('cat', [0, 0, 640, 240]), ('dog', [0, 240, 640, 480])]

Bins: big_vision, which trained PaliGemma, encodes a normalised coordinate c as
`round(c * 1023)`, and its own evaluator decodes `v / 1023`; we use that exact inverse (some
demo code divides by 1024 instead: at most one bin, 0.1% of the side, of difference).
`encode_box` and `parse_detections` round-trip to within half a bin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_MAX_BIN = 1023  # <loc0000>..<loc1023>
# Four loc tokens, optional seg tokens (segmentation output), then the label up to ";" or "<".
_OBJECT = re.compile(r"((?:<loc\d{4}>){4})(?:<seg\d{3}>)*([^;<]*)")
_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


@dataclass(frozen=True)
class Detection:
    """One detected object: label, pixel box (x0, y0, x1, y1), normalised (ymin, xmin, ymax, xmax)."""

    label: str
    box: tuple[float, float, float, float]
    normalized: tuple[float, float, float, float]


def parse_detections(text: str, image_width: int, image_height: int) -> list[Detection]:
    """All `<loc>`x4 + label objects in `text`, in pixels of a `image_width` x `image_height` image."""
    detections = []
    for locs, label in _OBJECT.findall(text):
        ymin, xmin, ymax, xmax = (int(v) / _MAX_BIN for v in re.findall(r"\d{4}", locs))
        box = (xmin * image_width, ymin * image_height, xmax * image_width, ymax * image_height)
        detections.append(Detection(label.strip(), box, (ymin, xmin, ymax, xmax)))
    return detections


def encode_box(box_xyxy, image_width: int, image_height: int) -> str:
    """Pixel box (x0, y0, x1, y1) -> the model's "<loc>"x4 text, (ymin, xmin, ymax, xmax) order.

        >>> encode_box((0, 0, 100, 50), 100, 100)
        '<loc0000><loc0000><loc0512><loc1023>'
    """
    x0, y0, x1, y1 = box_xyxy
    coords = (y0 / image_height, x0 / image_width, y1 / image_height, x1 / image_width)
    return "".join(f"<loc{min(max(round(c * _MAX_BIN), 0), _MAX_BIN):04d}>" for c in coords)


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """A copy of `image` with each box outlined and labelled (one colour per label)."""
    out = image.convert("RGB")  # convert() always copies: the caller's image is untouched
    draw = ImageDraw.Draw(out)
    width = max(2, min(out.size) // 150)  # visible on both thumbnails and photos
    font = ImageFont.load_default()
    colours = {}
    for det in detections:
        colour = colours.setdefault(det.label, _PALETTE[len(colours) % len(_PALETTE)])
        x0, y0, x1, y1 = det.box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        if det.label:
            # Label on a filled tab above the box, or inside it when the box touches the top.
            left, top, right, bottom = draw.textbbox((0, 0), det.label, font=font)
            tab_y = y0 - (bottom - top) - 4 if y0 >= (bottom - top) + 4 else y0
            draw.rectangle((x0, tab_y, x0 + right - left + 4, tab_y + bottom - top + 4), fill=colour)
            draw.text((x0 + 2 - left, tab_y + 2 - top), det.label, fill="white", font=font)
    return out
