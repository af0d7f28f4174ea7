"""Parity with transformers' PaliGemmaProcessor on the same tokenizer and image settings."""

import json

import numpy as np
import pytest
from PIL import Image

from pgexport.errors import PgExportError
from pgexport.processing.image import write_preprocessor_config
from pgexport.processing.processor import PaliGemmaProcessor, load_processor
from pgexport.processing.tokenizer import build_paligemma_tokenizer, save_tokenizer

transformers = pytest.importorskip("transformers")

IMAGE_SIZE, NUM_IMAGE_TOKENS = 32, 16
TEXT_KEYS = ["input_ids", "attention_mask", "token_type_ids"]


def make_folder(path, base_vocab_size, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS):
    save_tokenizer(build_paligemma_tokenizer(base_vocab_size), path)
    write_preprocessor_config(path, image_size, num_image_tokens)
    return path


def reference(folder):
    """transformers' processor on the PIL SigLIP backend (the torchvision one resizes differently)."""
    return transformers.PaliGemmaProcessor(
        image_processor=transformers.SiglipImageProcessorPil.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = make_folder(tmp_path_factory.mktemp("tiny"), 512)
    return PaliGemmaProcessor.from_pretrained(folder), reference(folder), folder


def noise(height=48, width=64, seed=0, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def run_both(pair, images, prompts, suffixes=None, padding_side="left"):
    ours, hf, _ = pair
    got = ours(images, prompts, suffixes, padding_side=padding_side)
    hf_images = images if isinstance(images, list) else [images] * len(prompts)
    want = hf(images=hf_images, text=prompts, suffix=suffixes, padding="longest",
              padding_side=padding_side, return_tensors="np")
    return got, want


def assert_same(got, want, with_labels):
    for key in TEXT_KEYS + (["labels"] if with_labels else []):
        assert got[key].dtype == np.int64, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    assert ("labels" in got) == with_labels


PROMPTS = ["caption en", "answer en how many red stars are there?", "detect circle ; blue square",
           "describe en", "Grüße  aus 🙂 Köln 42", ""]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_single_prompt(pair, prompt):
    assert_same(*run_both(pair, Image.fromarray(noise()), [prompt]), with_labels=False)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_different_lengths(pair, padding_side):
    images = [Image.fromarray(noise(seed=1)), Image.fromarray(noise(seed=2))]
    got, want = run_both(pair, images, ["caption en", "answer en what colour is the big star?"],
                         padding_side=padding_side)
    assert_same(got, want, with_labels=False)
    assert got["attention_mask"].sum(1).tolist() != [got["input_ids"].shape[1]] * 2  # really padded


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_suffixes_give_labels_on_the_suffix_only(pair, padding_side):
    images = [Image.fromarray(noise(seed=3)), Image.fromarray(noise(seed=4))]
    prompts = ["detect star ; cat", "answer en how many circles?"]
    suffixes = ["<loc0100><loc0200><loc0300><loc0400> red star ; <loc0001><loc0002><loc0003><loc0004> cat", "three"]
    got, want = run_both(pair, images, prompts, suffixes, padding_side=padding_side)
    assert_same(got, want, with_labels=True)
    suffix_ids = got["labels"][got["labels"] != -100]
    assert suffix_ids[-1] == pair[0].eos_id


def test_one_image_for_all_prompts(pair):
    got, want = run_both(pair, Image.fromarray(noise(seed=5)), ["caption en", "ocr"])
    assert_same(got, want, with_labels=False)


@pytest.mark.parametrize("name", ["rgb", "rgba", "greyscale", "palette", "palette_transparent", "la",
                                  "non_square_tall", "non_square_wide", "array_rgba", "array_grey", "tiny"])
def test_pixel_values_match(pair, name):
    rgb = Image.fromarray(noise(seed=6))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 7
    image = {
        "rgb": rgb,
        "rgba": Image.fromarray(noise(seed=7, channels=4), "RGBA"),
        "greyscale": Image.fromarray(noise(seed=8, channels=1), "L"),
        "palette": rgb.convert("P"),
        "palette_transparent": palette_transparent,
        "la": Image.fromarray(noise(seed=9, channels=4)[:, :, :2], "LA"),
        "non_square_tall": Image.fromarray(noise(97, 23, seed=10)),
        "non_square_wide": Image.fromarray(noise(20, 301, seed=11)),
        "array_rgba": noise(seed=12, channels=4),
        "array_grey": noise(seed=13, channels=1)[:, :, None],
        "tiny": Image.fromarray(noise(3, 5, seed=14)),
    }[name]
    assert_same(*run_both(pair, [image], ["caption en"]), with_labels=False)


def test_decode_matches_transformers(pair):
    ours, hf, _ = pair
    batch = ours(Image.fromarray(noise()), ["detect star", "caption en"],
                 ["<loc0010><loc0020><loc0300><loc0400> star ; <loc0001><loc0002><loc0003><loc0004> star", "a cat"])
    for skip in (True, False):
        assert ours.batch_decode(batch["input_ids"], skip) == hf.batch_decode(batch["input_ids"],
                                                                              skip_special_tokens=skip)
    assert ours.decode(batch["input_ids"][0]).endswith("<loc0001><loc0002><loc0003><loc0004> star")


def test_real_vocab_layout(tmp_path):
    """The 256000-token layout (loc at 256000, image at 257152) also matches."""
    folder = make_folder(tmp_path, 256000, image_size=28, num_image_tokens=4)
    ours, hf = PaliGemmaProcessor.from_pretrained(folder), reference(folder)
    got, want = run_both((ours, hf, folder), [Image.fromarray(noise(seed=i)) for i in range(2)],
                         ["detect star", "answer en what colour is the star?"], ["<loc0000><loc1023><loc0512><loc0001> star", "red"])
    assert_same(got, want, with_labels=True)
    assert got["input_ids"][1, 0] == 257152  # <image>


def test_transformers_autoprocessor_loads_our_folder(pair):
    hf = transformers.AutoProcessor.from_pretrained(pair[2])
    assert type(hf).__name__ == "PaliGemmaProcessor" and hf.image_seq_length == NUM_IMAGE_TOKENS


def test_loads_a_folder_saved_by_transformers(pair, tmp_path):
    """transformers 5.x save_pretrained nests the image settings in processor_config.json."""
    ours, hf, _ = pair
    hf.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert (loaded.image_size, loaded.num_image_tokens) == (IMAGE_SIZE, NUM_IMAGE_TOKENS)
    image = Image.fromarray(noise())
    for key, value in loaded(image, ["caption en"], ["a cat"]).items():
        np.testing.assert_array_equal(value, ours(image, ["caption en"], ["a cat"])[key])


def test_image_tokens_from_config_json(tmp_path):
    save_tokenizer(build_paligemma_tokenizer(512), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 56, "patch_size": 14}}))
    proc = PaliGemmaProcessor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_image_tokens) == (56, 16)
    assert PaliGemmaProcessor.from_pretrained(tmp_path, num_image_tokens=9).num_image_tokens == 9


def test_torch_tensors(pair):
    torch = pytest.importorskip("torch")
    batch = pair[0](Image.fromarray(noise()), ["caption en"], ["a cat"], return_tensors="pt")
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": torch.int64, "attention_mask": torch.int64, "token_type_ids": torch.int64,
        "labels": torch.int64, "pixel_values": torch.float32}


def single_line_error(call, *must_contain):
    with pytest.raises(PgExportError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in must_contain:
        assert part in message, message


def test_prompt_over_max_length(pair):
    ours = pair[0]
    length = ours(Image.fromarray(noise()), ["answer en how many stars are there?"])["input_ids"].shape[1]
    single_line_error(lambda: ours(Image.fromarray(noise()), ["caption en", "answer en how many stars are there?"],
                                   max_length=length - 1), str(length), f"max_length={length - 1}")
    assert ours(Image.fromarray(noise()), ["answer en how many stars are there?"], max_length=length)


def test_bad_calls(pair, tmp_path):
    ours = pair[0]
    image = Image.fromarray(noise())
    single_line_error(lambda: ours([image, image, image], ["a", "b"]), "3 images", "2 prompts")
    single_line_error(lambda: ours(image, ["<image>caption en"]), "<image>")
    single_line_error(lambda: ours(image, ["a"], ["x", "y"]), "2 suffixes")
    single_line_error(lambda: ours(tmp_path / "absent.png", ["a"]), "absent.png")
    single_line_error(lambda: PaliGemmaProcessor.from_pretrained(tmp_path), str(tmp_path))


def test_runtime_modules_do_not_import_torch():
    """The processor is used by the torch-free ONNX Runtime path."""
    import subprocess
    import sys
    from pathlib import Path

    import pgexport

    code = ("import sys, pgexport.processing.processor, pgexport.processing.detection; "
            "print(sorted(m for m in ('torch', 'transformers', 'pgexport.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(pgexport.__file__).parents[1])  # finds pgexport installed or not
    assert out.stdout.strip() == "[]"
