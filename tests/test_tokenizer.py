"""Tokenizer layout, byte fallback, determinism, loading and saving."""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

import pgexport

from pgexport.errors import PgExportError
from pgexport.processing.tokenizer import (
    LOC_TOKENS,
    SEG_TOKENS,
    SentencePieceTokenizer,
    build_paligemma_tokenizer,
    load_tokenizer,
    save_tokenizer,
)


@pytest.fixture(scope="module", params=[512, 256000])
def built(request):
    return request.param, build_paligemma_tokenizer(request.param)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_special_ids_at_documented_positions(built):
    base, tok = built
    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<0x00>": 4, "<0xFF>": 259, "▁": 260,
                "<loc0000>": base, "<loc1023>": base + 1023, "<seg000>": base + 1024,
                "<seg127>": base + 1151, "<image>": base + 1152}
    assert {t: tok.token_to_id(t) for t in expected} == expected
    assert tok.get_vocab_size() == base + 1153
    # Ordinary tokens fill exactly [0, base): nothing else below the loc tokens.
    assert sorted(i for t, i in tok.get_vocab().items() if i < base) == list(range(base))
    if base == 256000:
        assert tok.id_to_token(base - 1).startswith("<unused")


def test_specials_are_never_split(built):
    base, tok = built
    assert encode(tok, "<image><bos><loc0001><seg042><eos><pad>") == [base + 1152, 2, base + 1, base + 1024 + 42, 1, 0]


def test_newline_is_a_single_token(built):
    _, tok = built
    newline = encode(tok, "\n")
    assert len(newline) == 1 and tok.id_to_token(newline[0]) == "\n"
    assert encode(tok, "caption en\n")[-1] == newline[0]
    assert encode(tok, "how many stars are there?\n")[-1] == newline[0]


@pytest.mark.parametrize("text", ["Grüße aus Köln", "日本語のテキスト", "emoji 🙂👍🏽 ok", "tab\tand  two spaces",
                                  " leading and trailing ", "ÅΩ≈ç√∫˜µ≤≥÷", "mixed 123 ; 4.5?\n"])
def test_byte_fallback_round_trips_unicode(built, text):
    _, tok = built
    ids = encode(tok, text)
    assert 3 not in ids  # never <unk>: unknown characters become their UTF-8 bytes
    assert tok.decode(ids) == text


def test_skip_special_tokens_keeps_loc_and_seg(built):
    _, tok = built
    ids = encode(tok, "<image><bos>detect cat\n<loc0001><loc0002><loc0003><loc0004><seg005> cat<eos><pad>")
    assert tok.decode(ids) == "detect cat\n<loc0001><loc0002><loc0003><loc0004><seg005> cat"


def test_build_is_deterministic_across_processes():
    code = ("import hashlib; from pgexport.processing.tokenizer import build_paligemma_tokenizer as b; "
            "print(hashlib.sha256(b(512).to_str().encode()).hexdigest())")
    here = hashlib.sha256(build_paligemma_tokenizer(512).to_str().encode()).hexdigest()
    for _ in range(2):  # each process has its own hash seeds
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(pgexport.__file__).parents[1])  # finds pgexport installed or not
        assert out.stdout.strip() == here


def test_missing_tokenizer_names_folder_and_files(tmp_path):
    with pytest.raises(PgExportError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "tokenizer.json" in message and "tokenizer.model" in message


def test_corrupt_tokenizer_json_names_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PgExportError) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_saved_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = build_paligemma_tokenizer(512)
    save_tokenizer(tok, tmp_path)
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "answer en what colour is the <loc0001> star? Grüße 🙂\n"
    assert hf(text).input_ids == [2] + encode(tok, text)  # Gemma adds <bos> by default
    assert len(hf) == tok.get_vocab_size()
    assert hf.decode(encode(tok, text + "<eos>"), skip_special_tokens=True) == text


def _corpus() -> list[str]:
    """PaliGemma-style prompts and answers to train the SentencePiece model on."""
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown", "cyan")
    shapes = ("circle", "square", "triangle", "star", "diamond", "cat", "dog", "car")
    places = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
    numbers = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    lines = ["caption en\n", "describe en\n", "ocr\n", "answer en how many shapes are there?\n"]
    for i, colour in enumerate(colours * 4):
        shape, place, num = shapes[i % len(shapes)], places[i % len(places)], numbers[i % len(numbers)]
        lines += [f"caption en\na {colour} {shape} on the {place} of the image.",
                  f"answer en what colour is the {shape}?\n{colour}",
                  f"answer en how many {shape}s are there in the {place}?\n{num}",
                  f"detect {shape} ; {colour} {shape}\n",
                  f"describe en\n{num} {colour} {shape}s, {i} in the {place} and {i * 7} at the top."]
    return lines


def _train_sentencepiece(tmp_path):
    """A tiny Gemma-like SentencePiece model (loc/seg inside, no <image>)."""
    spm = pytest.importorskip("sentencepiece")

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() * 3), model_writer=model, model_type="bpe", vocab_size=1700,
        hard_vocab_limit=False, byte_fallback=True, add_dummy_prefix=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=LOC_TOKENS + SEG_TOKENS + ["\n"])
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())


def test_sentencepiece_model_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _train_sentencepiece(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.token_to_id("<image>") == tok.get_vocab_size() - 1  # appended after the pieces
    save_tokenizer(tok, tmp_path)  # configs only: the model file is already there
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})  # as PaliGemmaProcessor does...
    hf.add_tokens(LOC_TOKENS + SEG_TOKENS)  # ...its converter does not match user-defined pieces
    for text in ["<image><bos>caption en\n", "detect star ; cat\n<loc0001><loc0002><loc0003><loc0004> red star<eos>",
                 "Grüße  🙂 12\n"]:
        ids = tok.encode(text).ids
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
