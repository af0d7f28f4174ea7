"""Image loading and SigLIP preprocessing in NumPy (no torch), matching `transformers`.

PaliGemma sees a square RGB image resized with bicubic resampling, scaled to [0, 1] and
normalised with mean 0.5 / std 0.5, i.e. values in [-1, 1], channels first:

    >>> from PIL import Image
    >>> pixels = preprocess_images([Image.new("RGB", (640, 480), "red")], size=224)
    >>> pixels.shape, pixels.dtype, float(pixels[0, 0, 0, 0])
    ((1, 3, 224, 224), dtype('float32'), 1.0)

Each step reproduces `transformers`' SigLIP image processor (PIL backend) operation for
operation, so the values agree to float32 rounding: transparency is composited onto white,
the resize is Pillow's on uint8 pixels, the rescale is done in float64, the normalisation in
float32.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pgexport.errors import PgExportError

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value stored in preprocessor_config.json
PREPROCESSOR_FILE = "preprocessor_config.json"


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and decode it fully, so that a truncated file fails here.

        >>> load_image("cat.jpg").size  # doctest: +SKIP
        (640, 480)
    """
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decoding is lazy: without this a truncated file "opens" fine
                return image
    except FileNotFoundError:
        raise PgExportError(f"image file not found: {path}; check the path") from None
    except IsADirectoryError:
        raise PgExportError(f"{path} is a folder, not an image file; pass the path of an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))  # Pillow: "Image size (N pixels) exceeds ..."
        raise PgExportError(f"image {path} has {pixels.group(1) if pixels else 'too many'} pixels, over Pillow's "
                            f"decompression-bomb limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; downscale "
                            "it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except Image.UnidentifiedImageError:
        raise PgExportError(f"{path} is not an image Pillow can read; pass a PNG, JPEG, WebP, ... file") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports truncation/corruption this way
        raise PgExportError(f"image {path} is truncated or corrupt ({e}); re-download or re-save it") from None


def _to_rgb(image) -> np.ndarray:
    """Any supported input -> uint8 RGB array [H, W, 3], as transformers' `convert_to_rgb`."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # RGBA, LA, and palette/greyscale images with a transparent colour: onto white.
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise PgExportError(f"unsupported image array {array.dtype}{list(array.shape)}; "
                            "pass uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGB or RGBA)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:  # blend onto white in float64 and round, as transformers does for arrays
        alpha = array[:, :, 3:] / 255
        return np.round(alpha * array[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def preprocess_images(images, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                      resample: int = BICUBIC) -> np.ndarray:
    """Images (PIL images, file paths or uint8 HWC arrays) -> float32 [B, 3, size, size]."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    batch = []
    for image in images:
        rgb = Image.fromarray(_to_rgb(image))
        resized = np.asarray(rgb.resize((size, size), resample=resample))  # [H, W, 3] uint8
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale in float64
        batch.append(((scaled - mean) / std).transpose(2, 0, 1))  # [3, H, W]
    return np.stack(batch)  # [B, 3, size, size]


def write_preprocessor_config(folder: str | Path, image_size: int, num_image_tokens: int,
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample: int = BICUBIC) -> None:
    """Write a `preprocessor_config.json` like the published PaliGemma checkpoints'."""
    config = {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "image_seq_length": int(num_image_tokens),
        "size": {"height": int(image_size), "width": int(image_size)},
        "resample": int(resample),
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in mean],
        "image_std": [float(x) for x in std],
        "do_convert_rgb": True,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_image_settings(folder: str | Path) -> dict:
    """Image settings from `preprocessor_config.json` or `processor_config.json`.

    transformers 5.x `save_pretrained` writes the latter, with the settings nested under
    "image_processor". Settings absent from the folder keep the PaliGemma defaults;
    `image_size` and `num_image_tokens` are then None.

        >>> read_image_settings("paligemma-3b-pt-224")  # doctest: +SKIP
        {'image_size': 224, 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5], 'resample': 3, 'num_image_tokens': 256}
    """
    folder = Path(folder)
    config = {}
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (folder / name).is_file():
            try:
                config = json.loads((folder / name).read_text())
            except (OSError, ValueError) as e:
                raise PgExportError(f"cannot read {folder / name}: {e}; fix or delete the file") from None
            config = config.get(key, {}) if key else config
            break
    size = config.get("size") or {}
    height = size.get("height", size.get("shortest_edge"))
    if height is not None and size.get("width", height) != height:
        raise PgExportError(f"{folder}: image size {size} is not square; PaliGemma needs height == width")
    return {
        "image_size": height,
        "mean": config.get("image_mean", [0.5, 0.5, 0.5]),
        "std": config.get("image_std", [0.5, 0.5, 0.5]),
        "resample": config.get("resample", BICUBIC),
        "num_image_tokens": config.get("image_seq_length"),
    }
