"""The built-in demo model: a small PaliGemma trained from scratch on the synthetic shapes data.

Same architecture as PaliGemma 1 (SigLIP tower, linear projector, Gemma decoder, prefix-LM),
only narrower and shallower, with four KV heads rather than multi-query attention (which learned
slower at this width), at 112 px (an 8 x 8 grid of 14-px patches = 64 image tokens), with the 512-token stand-in
tokenizer (`build_paligemma_tokenizer(512)`). It is trained by `examples/train_demo.py` and shipped in `pgexport/assets/demo/`; `pgexport generate` and the
other commands use it when no `--model` is given.

    >>> cfg = demo_config()
    >>> cfg.vision.image_size, cfg.num_image_tokens, cfg.text.vocab_size
    (112, 64, 1728)
"""

from __future__ import annotations

from pgexport.bundled import DEMO_DIR
from pgexport.models.config import PaliGemmaConfig, TextConfig, VisionConfig, tiny_vocab_size

__all__ = ["DEMO_DIR", "DEMO_BASE_VOCAB", "demo_config"]

DEMO_BASE_VOCAB = 512  # ordinary tokens of the demo tokenizer; <loc0000> = 512, <image> = 1664


def demo_config(image_size: int = 112, patch_size: int = 14, kv_heads: int = 4):
    """The demo model's `PaliGemmaConfig` (about 2.0 M parameters)."""
    vocab, image_id = tiny_vocab_size(DEMO_BASE_VOCAB)
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=image_size, patch_size=patch_size)
    text = TextConfig(model_type="gemma", vocab_size=vocab, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32,
                      max_position_embeddings=256)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=image_id)
