"""Eager PyTorch generation: the model's `EagerStepper` driven by the shared generation loop.

The loop (`pgexport.runtime.generation.generate_tokens`) is the one the ONNX Runtime backend uses,
so both backends stop, pad and sample the same way.

    >>> out = generate(model, **processor(images=[img], prompts=["caption en"]), max_new_tokens=20)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pgexport.models.generate import EagerStepper
from pgexport.models.paligemma import PaliGemma
from pgexport.processing.streaming import stream_text
from pgexport.runtime.generation import Sampling, generate_tokens, iter_tokens


def generate(
    model: PaliGemma,
    input_ids,
    attention_mask,
    pixel_values,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
) -> np.ndarray:
    """Generated token ids `[B, n]` for processor outputs; greedy unless `sampling` says otherwise.

    >>> out = generate(model, **processor(images=[img], prompts=["caption en"]), max_new_tokens=20)  # doctest: +SKIP
    """
    cfg = model.cfg
    return generate_tokens(EagerStepper(model), np.asarray(input_ids), np.asarray(attention_mask), pixel_values,
                           max_new_tokens, cfg.eos_token_id, cfg.pad_token_id, sampling)


def generate_text(model: PaliGemma, processor, images: list[Any], prompts: list[str], max_new_tokens: int = 32,
                  sampling: Sampling | None = None) -> list[str]:
    """Generate text for each (image, prompt) pair; returns the decoded strings.

    >>> generate_text(model, processor, [img], ["detect circle"], max_new_tokens=16)  # doctest: +SKIP
    ['<loc0123><loc0045><loc0456><loc0789> circle']
    """
    batch = processor.generation_batch(images, prompts, max_new_tokens, model.cfg.text.max_position_embeddings)
    ids = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens, sampling)
    return processor.batch_decode(ids, skip_special_tokens=True)


def generate_stream(model: PaliGemma, processor, image, prompt: str, max_new_tokens: int = 32,
                    sampling: Sampling | None = None) -> Iterator[str]:
    """The text for one image and prompt, in pieces as the tokens arrive (joined: `generate_text`'s
    text). Stop iterating to stop generating.

    >>> for piece in generate_stream(model, processor, img, "caption en"):  # doctest: +SKIP
    ...     print(piece, end="", flush=True)
    """
    cfg = model.cfg
    batch = processor.generation_batch([image], [prompt], max_new_tokens, cfg.text.max_position_embeddings)
    steps = iter_tokens(EagerStepper(model), batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                        max_new_tokens, cfg.eos_token_id, cfg.pad_token_id, sampling)
    return stream_text(steps, processor.tokenizer, cfg.eos_token_id)
