"""Files shipped inside the package: the sample picture and the built-in demo model.

    >>> sample_image().size
    (224, 224)
    >>> default_model() == str(DEMO_DIR)   # the trained demo model ships with the package
    True
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ASSETS = Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.png"
# The demo model: trained from scratch on the synthetic shapes data by examples/train_demo.py
# (architecture in pgexport.train.demo).
DEMO_DIR = ASSETS / "demo"


def sample_image() -> Image.Image:
    """A small picture of three shapes shipped with the package (PIL image)."""
    return Image.open(SAMPLE_IMAGE).convert("RGB")


def default_model() -> str:
    """What runs when no `--model` is given: the bundled demo model.

    A source checkout where the demo has not been trained yet falls back to the random preset.
    """
    return str(DEMO_DIR) if (DEMO_DIR / "config.json").is_file() else "paligemma-tiny"
