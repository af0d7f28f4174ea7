"""The built-in demo model: a small PaliGemma trained from scratch on the synthetic shapes data.

Same architecture as PaliGemma 1 (SigLIP tower, linear projector, Gemma decoder with
multi-query attention, prefix-LM), only narrower and shallower, at 84 px (36 image tokens: one 3 x 3 grid cell of the shapes data = 2 x 2 patches),
with the 512-token stand-in tokenizer (`build_paligemma_tokenizer(512)`). It is trained by
`examples/train_demo.py` and shipped in `pgexport/assets/demo/`; `pgexport generate` and the
other commands use it when no `--model` is given.

    >>> cfg = demo_config()
    >>> cfg.vision.image_size, cfg.num_image_tokens, cfg.text.vocab_size
    (84, 36, 1728)
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
DEMO_BASE_VOCAB = 512  # ordinary tokens of the demo tokenizer; <loc0000> = 512, <image> = 1664


def demo_config():
    """The demo model's `PaliGemmaConfig` (about 2.0 M parameters)."""
    from .models.config import PaliGemmaConfig, TextConfig, VisionConfig, tiny_vocab_size

    vocab, image_id = tiny_vocab_size(DEMO_BASE_VOCAB)
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=84, patch_size=14)
    text = TextConfig(model_type="gemma", vocab_size=vocab, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=256)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=image_id)


def demo_model_path() -> Path:
    return DEMO_DIR
