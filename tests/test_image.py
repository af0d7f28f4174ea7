"""Image loading errors, input types and preprocessor config files.

Pixel parity with transformers is in test_processor.py.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pgexport.errors import PgExportError
from pgexport.processing.image import load_image, preprocess_images, read_image_settings, write_preprocessor_config


def noise(height=48, width=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def raises_one_line(path, *must_contain):
    with pytest.raises(PgExportError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    for part in (str(path), *must_contain):
        assert part in message
    return message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_names_the_file(tmp_path, fmt):
    data = encoded(noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    raises_one_line(path, "truncated")


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    raises_one_line(path)


def test_missing_file(tmp_path):
    raises_one_line(tmp_path / "absent.jpg", "not found")


@pytest.mark.parametrize("limit", [1000, 3000])  # > 2x limit: Pillow errors; > 1x: it only warns
def test_decompression_bomb_names_file_and_limit(tmp_path, monkeypatch, limit):
    path = tmp_path / "big.png"
    noise(64, 64).save(path)  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    raises_one_line(path, str(limit), "4096")


def test_loaded_image_outlives_its_file(tmp_path):
    path = tmp_path / "ok.png"
    noise().save(path)
    image = load_image(path)
    path.unlink()
    assert np.array_equal(np.asarray(image), np.asarray(noise()))


def test_paths_pil_and_arrays_give_the_same_pixels(tmp_path):
    image = noise()
    image.save(tmp_path / "a.png")
    from_pil = preprocess_images([image], 32)
    assert from_pil.shape == (1, 3, 32, 32) and from_pil.dtype == np.float32
    assert np.array_equal(preprocess_images([tmp_path / "a.png"], 32), from_pil)
    assert np.array_equal(preprocess_images(str(tmp_path / "a.png"), 32), from_pil)
    assert np.array_equal(preprocess_images([np.asarray(image)], 32), from_pil)
    grey = np.asarray(image.convert("L"))
    assert np.array_equal(preprocess_images([grey], 32), preprocess_images([grey[:, :, None]], 32))
    assert -1 <= from_pil.min() and from_pil.max() <= 1


def test_bad_array_is_a_user_error():
    with pytest.raises(PgExportError) as info:
        preprocess_images([np.zeros((8, 8, 3), np.float32)], 16)
    assert "uint8" in str(info.value)


def test_preprocessor_config_round_trip(tmp_path):
    write_preprocessor_config(tmp_path, 448, 1024)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "SiglipImageProcessor"
    assert config["processor_class"] == "PaliGemmaProcessor"
    assert read_image_settings(tmp_path) == {"image_size": 448, "mean": [0.5] * 3, "std": [0.5] * 3,
                                             "resample": 3, "num_image_tokens": 1024}


def test_nested_processor_config(tmp_path):
    nested = {"image_processor": {"size": {"height": 224, "width": 224}, "image_mean": [0.4, 0.5, 0.6],
                                  "image_std": [0.2, 0.3, 0.4], "resample": 2, "image_seq_length": 256}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert read_image_settings(tmp_path) == {"image_size": 224, "mean": [0.4, 0.5, 0.6],
                                             "std": [0.2, 0.3, 0.4], "resample": 2, "num_image_tokens": 256}


def test_missing_settings_are_none(tmp_path):
    settings = read_image_settings(tmp_path)
    assert settings["image_size"] is None and settings["num_image_tokens"] is None


def test_transformers_loads_the_written_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_preprocessor_config(tmp_path, 224, 256)
    hf = transformers.SiglipImageProcessorPil.from_pretrained(tmp_path)
    assert hf.size["height"] == hf.size["width"] == 224 and hf.image_seq_length == 256
    assert hf.resample == 3 and hf.do_convert_rgb and hf.do_normalize
