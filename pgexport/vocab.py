"""PaliGemma's vocabulary layout, shared by the tokenizer, the model config and the exporters.

Every PaliGemma tokenizer is the base (Gemma) vocabulary followed by 1024 `<locNNNN>` detection
tokens, 128 `<segNNN>` segmentation tokens and one `<image>` placeholder, so the base size follows
from the `<image>` id:

    >>> base_vocab_size(257152)          # the published checkpoints: 256000 Gemma tokens
    256000
    >>> image_token_id(512)              # the stand-in tokenizer of the tiny presets
    1664

A dependency-free leaf: the torch-free core and `pgexport.models` both import it.
"""

from __future__ import annotations

NUM_LOC_TOKENS = 1024
NUM_SEG_TOKENS = 128


def image_token_id(base_vocab: int) -> int:
    """The `<image>` id of a tokenizer with `base_vocab` ordinary tokens."""
    return base_vocab + NUM_LOC_TOKENS + NUM_SEG_TOKENS


def base_vocab_size(image_token: int) -> int:
    """The number of ordinary tokens before `<loc0000>`, from the `<image>` id."""
    return image_token - NUM_LOC_TOKENS - NUM_SEG_TOKENS
