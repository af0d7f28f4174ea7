"""Eager PyTorch generation: the model's `EagerStepper` driven by the shared generation loop.

The loop (`pgexport.runtime.generation.generate_tokens`) is the one the ONNX Runtime backend uses,
so both backends stop, pad and sample the same way.

    >>> out = generate(model, **processor(images=[img], prompts=["caption en"]), max_new_tokens=20)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pgexport.errors import PgExportError
from pgexport.models.generate import EagerStepper
from pgexport.models.paligemma import PaliGemma
from pgexport.runtime.generation import Sampling, generate_tokens


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
    context = model.cfg.text.max_position_embeddings
    if max_new_tokens >= context:
        raise PgExportError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} tokens "
                            "(prompt included); ask for fewer new tokens")
    batch = processor(images=images, prompts=prompts, max_length=context - max_new_tokens)
    ids = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens, sampling)
    return processor.batch_decode(ids, skip_special_tokens=True)
