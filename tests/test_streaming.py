"""Streaming generation: text pieces as the tokens arrive, equal to `generate`'s text when joined.

The incremental detokenizer is checked on texts with multi-byte characters (byte-fallback
tokens, where one character spans several tokens), on `<locNNNN>` detection output, and on
random token sequences (lone and invalid bytes included); the streaming forms of the ONNX
Runtime and eager backends against their `generate`, on a random model that emits arbitrary
tokens; stopping from the consumer's side; and `pgexport generate --stream`.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pgexport.processing.streaming import REPLACEMENT, TextStream, stream_text
from pgexport.processing.tokenizer import build_paligemma_tokenizer
from pgexport.runtime.generation import iter_tokens

TEXTS = [
    "a red circle and a blue square",
    "<loc0041><loc0726><loc0288><loc0973> diamond ; <loc0001><loc0002><loc0003><loc0004> circle",
    "naïve café ünïcödé ✓ 日本語 🎉🎉 done",
    "\n  spaces  and\ttabs ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_paligemma_tokenizer(512)


def pieces_of(tokenizer, ids):
    stream = TextStream(tokenizer)
    pushed = [stream.push(i) for i in ids]
    return pushed, stream.finish()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pushed, tail = pieces_of(tokenizer, ids)
    assert "".join(pushed) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT in p for p in pushed)  # never half a character


def test_a_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False).ids
    byte_tokens = [i for i in ids if tokenizer.id_to_token(i).startswith("<0x")]
    assert len(byte_tokens) == 4  # the emoji is four UTF-8 bytes, one token each
    pushed, tail = pieces_of(tokenizer, ids)
    assert pushed[-4:] == ["", "", "", ""]  # a run of byte tokens is held back ...
    assert tail == "🎉"  # ... until it ends (here: the end of the text)
    pushed, tail = pieces_of(tokenizer, ids + tokenizer.encode(" done", add_special_tokens=False).ids)
    assert pushed[len(ids)].startswith("🎉") and tail == ""  # or the next ordinary token closes it


def test_random_token_sequences(tokenizer):
    """Any ids, including lone, truncated or invalid byte sequences and special tokens."""
    rng = np.random.default_rng(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(200):
        n = int(rng.integers(1, 30))
        ids = rng.integers(0, vocab, n).tolist()
        if rng.random() < 0.5:  # byte tokens are rare in a uniform draw: add runs of them
            start = int(rng.integers(0, n))
            ids[start:] = rng.integers(4, 260, n - start).tolist()
        pushed, tail = pieces_of(tokenizer, ids)
        assert "".join(pushed) + tail == tokenizer.decode(ids, skip_special_tokens=True), ids


class CountingStepper:
    def __init__(self, vocab: int, batch: int = 1):
        self.vocab, self.batch, self.decodes = vocab, batch, 0

    def logits(self, token):
        out = np.zeros((self.batch, self.vocab), np.float32)
        out[:, token] = 1.0
        return out

    def prefill(self, *args):
        return self.logits(300)  # ordinary word pieces (ids 4..259 are byte tokens)

    def decode(self, tokens):
        self.decodes += 1
        return self.logits(300 + self.decodes)


def test_stopping_early_stops_decoding(tokenizer):
    stepper = CountingStepper(tokenizer.get_vocab_size())
    ids, mask = np.ones((1, 4), np.int64), np.ones((1, 4), np.int64)
    steps = iter_tokens(stepper, ids, mask, None, max_new_tokens=50, eos_token_id=1, pad_token_id=0)
    stream = stream_text(steps, tokenizer, eos_token_id=1)
    got = [next(stream), next(stream)]
    assert len(got) == 2 and stepper.decodes == 1  # the second token came from one decode step
    stream.close()  # the consumer stops: the generation stops with it
    assert stepper.decodes == 1
    with pytest.raises(StopIteration):
        next(steps)


# ----------------------------------------------------------------------------- backends
torch = pytest.importorskip("torch")

import pgexport  # noqa: E402
from pgexport.cli import main as cli  # noqa: E402
from pgexport.eager.generate import generate_stream, generate_text  # noqa: E402
from pgexport.exporters.pipeline import export_folder  # noqa: E402
from pgexport.models import PaliGemma, PaliGemmaConfig  # noqa: E402
from pgexport.runtime import OnnxPaliGemma  # noqa: E402

PROMPTS = ["caption en", "detect circle ; square", "answer en what colour is the circle?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random model loud enough to emit arbitrary tokens (byte tokens and loc tokens among
    them), its processor, and its export."""
    model = PaliGemma.random(PaliGemmaConfig.from_preset("paligemma-tiny"), seed=3, std=0.2)
    processor = pgexport.load_processor("paligemma-tiny")
    out = tmp_path_factory.mktemp("stream") / "export"
    export_folder(model, out, validate=False, progress=None, processor=processor)
    return model, processor, out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_onnx_and_eager_streams_equal_generate(tiny, prompt):
    model, processor, out = tiny
    rt = OnnxPaliGemma(out, threads=1)
    image = pgexport.sample_image()
    want = rt.generate([image], [prompt], max_new_tokens=24)[0]
    assert len(want) > 5
    assert "".join(rt.generate_stream(image, prompt, max_new_tokens=24)) == want
    eager_want = generate_text(model, processor, [image], [prompt], max_new_tokens=24)[0]
    assert "".join(generate_stream(model, processor, image, prompt, max_new_tokens=24)) == eager_want == want


def test_sampled_stream_equals_sampled_generate(tiny):
    _, _, out = tiny
    rt = OnnxPaliGemma(out, threads=1)
    sampling = pgexport.Sampling(do_sample=True, top_p=0.9, seed=5)
    image = pgexport.sample_image()
    want = rt.generate([image], ["caption en"], max_new_tokens=16, sampling=sampling)[0]
    assert "".join(rt.generate_stream(image, "caption en", max_new_tokens=16, sampling=sampling)) == want


def test_cli_stream_prints_what_generate_prints(tiny):
    _, _, out = tiny
    args = ["generate", "--backend", "onnx", "--model", str(out), "--prompt", "detect circle", "--max-new-tokens", "12"]
    plain = CliRunner().invoke(cli, args)
    streamed = CliRunner().invoke(cli, args + ["--stream"])
    assert plain.exit_code == streamed.exit_code == 0, streamed.output
    assert streamed.output == plain.output and plain.output.strip()
