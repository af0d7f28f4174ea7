"""Gemma 2's sliding window with padded batches: every row attends exactly as it would alone.

The reference is transformers on each row by itself (no padding: slots and positions agree),
fed the prompt as a bidirectional prefix (`token_type_ids` 0) and the generated tokens as a
causal suffix (1). Our batched generation (eager stepper, and the exported prefill/decode
graphs under ONNX Runtime) must give each row's logits at every step. The windows are shorter
than the prompts (5 and 16 tokens against 16 image tokens + text), so a window counted in KV
slots would let the padding inside the buffer take the place of real tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import make_prompts, random_pixels  # noqa: E402

from pgexport.exporters.pipeline import export_folder  # noqa: E402
from pgexport.models.generate import EagerStepper  # noqa: E402
from pgexport.runtime.generation import generate_tokens  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402

WINDOWED = ["pg2-kv1-win5", "pg2"]  # windows of 5 and 16 tokens, both shorter than every prompt
NEW_TOKENS = 10
LOGIT_ATOL = 1e-4


class Recording:
    """A stepper wrapper that keeps the logits of every step (prefill, then each decode)."""

    def __init__(self, stepper):
        self.stepper, self.logits = stepper, []

    def prefill(self, *args):
        out = self.stepper.prefill(*args)
        self.logits.append(np.asarray(out, np.float32))
        return out

    def decode(self, tokens):
        out = self.stepper.decode(tokens)
        self.logits.append(np.asarray(out, np.float32))
        return out


def padded_batch(cfg, side: str):
    """Three prompts, the middle one shortest (the most padding), padded on `side`; with
    `side="mixed"` the rows are padded left, right and left (an application that builds its
    own batch may do either)."""
    lengths = [6, 1, 4]
    if side != "mixed":
        ids, mask = make_prompts(cfg, lengths, side=side, seed=21)
        return ids.numpy(), mask.numpy()
    left, left_mask = make_prompts(cfg, lengths, side="left", seed=21)
    right, right_mask = make_prompts(cfg, lengths, side="right", seed=21)
    ids, mask = left.clone(), left_mask.clone()
    ids[1], mask[1] = right[1], right_mask[1]
    return ids.numpy(), mask.numpy()


def transformers_alone(hf, row_ids: np.ndarray, generated: list[int], pixels: torch.Tensor) -> np.ndarray:
    """transformers' logits for one unpadded row: at the prompt's last token and after each of
    the first len(generated) - 1 generated tokens (what each generation step predicted from)."""
    ids = torch.tensor([list(row_ids) + generated[:-1]])
    token_type = torch.tensor([[0] * len(row_ids) + [1] * (len(generated) - 1)])
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                    token_type_ids=token_type, position_ids=torch.arange(1, ids.shape[1] + 1)[None]).logits
    return logits[0, len(row_ids) - 1:].float().numpy()  # [len(generated), V]


def check_rows_match_transformers(hf, cfg, stepper, ids, mask, pixels):
    rec = Recording(stepper)
    tokens = generate_tokens(rec, ids, mask, pixels.numpy(), NEW_TOKENS, eos_token_id=None, pad_token_id=cfg.pad_token_id)
    assert tokens.shape == (len(ids), NEW_TOKENS)
    steps = np.stack(rec.logits, axis=1)  # [B, steps, V]
    worst = 0.0
    for row in range(len(ids)):
        real = ids[row][mask[row].astype(bool)]
        generated = tokens[row].tolist()
        ref = transformers_alone(hf, real, generated, pixels[row:row + 1])
        got = steps[row, :len(generated)]
        worst = max(worst, float(np.abs(got - ref).max()))
        assert np.array_equal(got.argmax(-1), ref.argmax(-1)), f"row {row}: greedy choices differ from the row alone"
    assert worst < LOGIT_ATOL, f"max logit difference {worst:.2e} against transformers on each row alone"
    assert len(set(tokens.ravel().tolist())) > 3  # a degenerate random model would prove nothing


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
@pytest.mark.parametrize("variant", WINDOWED)
def test_eager_padded_batch_matches_each_row_alone(hf_model_pair, variant, side):
    hf, ours, cfg = hf_model_pair(variant)
    assert cfg.text.sliding_window < cfg.num_image_tokens + 3  # the window is shorter than any prompt
    ids, mask = padded_batch(cfg, side)
    check_rows_match_transformers(hf, cfg, EagerStepper(ours), ids, mask, random_pixels(cfg, len(ids), seed=22))


@pytest.fixture(scope="module")
def windowed_export(hf_model_pair, tmp_path_factory):
    hf, ours, cfg = hf_model_pair("pg2-kv1-win5")
    out = tmp_path_factory.mktemp("windowed") / "export"
    export_folder(ours, out, validate=False, progress=None)
    return hf, cfg, OnnxPaliGemma(out, threads=1)


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_graphs_padded_batch_match_each_row_alone(windowed_export, side):
    hf, cfg, rt = windowed_export
    ids, mask = padded_batch(cfg, side)
    check_rows_match_transformers(hf, cfg, rt.stepper(), ids, mask, random_pixels(cfg, len(ids), seed=22))
