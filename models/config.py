"""Model configuration: dataclasses that read and write Hugging Face `config.json`.

One `PaliGemmaConfig` holds a `VisionConfig` (SigLIP) and a `TextConfig` (Gemma or Gemma 2).
Fields missing from a `config.json` take the defaults of the matching `transformers` config
class, because the published checkpoints rely on them (`head_dim`, `rms_norm_eps`, ...).

Named presets cover every published geometry plus tiny ones for tests:

    >>> cfg = PaliGemmaConfig.from_preset("paligemma2-3b-pt-448")
    >>> cfg.num_image_tokens
    1024
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgexport import vocab



@dataclass
class VisionConfig:
    """SigLIP vision tower (So400m/14 for every published PaliGemma)."""

    hidden_size: int = 1152  # width of every patch embedding
    intermediate_size: int = 4304  # MLP width
    num_hidden_layers: int = 27
    num_attention_heads: int = 16  # head_dim = hidden_size / heads = 72
    num_channels: int = 3
    image_size: int = 224  # square input side in pixels
    patch_size: int = 14  # image_size // patch_size patches per side
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    model_type: str = "gemma"  # "gemma" or "gemma2": selects the Gemma 2 additions below
    vocab_size: int = 257216  # embedding rows (the tokenizer's 257153 padded to a multiple of 64)
    hidden_size: int = 2048
    intermediate_size: int = 16384  # MLP width (gate/up projections)
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # 1 = multi-query, < heads = grouped-query attention
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192  # context length the model was trained for
    hidden_act: str = "gelu_pytorch_tanh"
    # --- Gemma 2 only (ignored when model_type == "gemma") ---
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # tanh(s / c) * c on attention scores (50)
    final_logit_softcapping: float | None = None  # same on the output logits (30)
    sliding_window: int | None = None  # window of the "sliding_attention" layers (4096)
    layer_types: list[str] | None = None  # per layer: "sliding_attention" | "full_attention"

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        scalar = self.query_pre_attn_scalar if self.is_gemma2 and self.query_pre_attn_scalar else self.head_dim
        return float(scalar) ** -0.5

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding window of one layer, or None for global attention."""
        if not self.is_gemma2 or self.sliding_window is None or self.layer_types is None:
            return None
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


@dataclass
class PaliGemmaConfig:
    """The whole model: vision tower, projector, decoder and the special token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 257152  # `<image>` placeholder, replaced by projected image features
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def is_paligemma2(self) -> bool:
        return self.text.is_gemma2

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str) -> "PaliGemmaConfig":
        """Config of a named preset, e.g. `paligemma-3b-pt-224` or `paligemma-tiny`."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]()

    # ---------------------------------------------------------------- config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "PaliGemmaConfig":
        """Read a Hugging Face PaliGemma `config.json` (any transformers version)."""
        if d.get("model_type") not in (None, "paligemma"):
            raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'paligemma'")
        if d.get("tie_word_embeddings", True) is False or (d.get("text_config") or {}).get("tie_word_embeddings", True) is False:
            raise ValueError("tie_word_embeddings=false: PaliGemma ties its LM head to the embeddings; an untied head is not supported")
        v = d.get("vision_config") or {}
        t = d.get("text_config") or {}
        vision = VisionConfig(
            hidden_size=v.get("hidden_size", 768),
            intermediate_size=v.get("intermediate_size", 3072),
            num_hidden_layers=v.get("num_hidden_layers", 12),
            num_attention_heads=v.get("num_attention_heads", 12),
            num_channels=v.get("num_channels", 3),
            image_size=_side(v.get("image_size", 224)),
            patch_size=_side(v.get("patch_size", 16)),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        )
        if v.get("vision_use_head", False):
            raise ValueError("vision_config.vision_use_head=true is not PaliGemma (it uses no pooling head)")
        model_type = t.get("model_type", "gemma")
        if model_type not in ("gemma", "gemma2"):
            raise ValueError(f"text_config.model_type {model_type!r} is not supported (gemma or gemma2)")
        g2 = model_type == "gemma2"
        # transformers defaults differ between GemmaConfig and Gemma2Config.
        defaults = _GEMMA2_DEFAULTS if g2 else _GEMMA_DEFAULTS
        get = lambda k: t.get(k, defaults.get(k))  # noqa: E731
        rope = t.get("rope_parameters") or {}
        num_layers = get("num_hidden_layers")
        text = TextConfig(
            model_type=model_type,
            vocab_size=t.get("vocab_size", d.get("vocab_size", defaults["vocab_size"])),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            rms_norm_eps=get("rms_norm_eps"),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            max_position_embeddings=get("max_position_embeddings"),
            hidden_act=t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh",
        )
        if g2:
            text.query_pre_attn_scalar = get("query_pre_attn_scalar")
            text.attn_logit_softcapping = get("attn_logit_softcapping")
            text.final_logit_softcapping = get("final_logit_softcapping")
            text.sliding_window = get("sliding_window")
            # transformers: layer 0 slides, then alternate.
            text.layer_types = t.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
            ]
        return cls(
            vision=vision,
            text=text,
            image_token_id=d.get("image_token_index", d.get("image_token_id", 257152)),
            pad_token_id=_first(d.get("pad_token_id", t.get("pad_token_id", 0))),
            eos_token_id=_first(d.get("eos_token_id", t.get("eos_token_id", 1))),
            bos_token_id=_first(d.get("bos_token_id", t.get("bos_token_id", 2))),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers (4.41+ and 5.x) reads back to the same model."""
        v, t = self.vision, self.text
        text: dict[str, Any] = {
            "model_type": t.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_activation": t.hidden_act,
            "num_image_tokens": self.num_image_tokens,
        }
        if t.is_gemma2:
            text.update(
                query_pre_attn_scalar=t.query_pre_attn_scalar,
                attn_logit_softcapping=t.attn_logit_softcapping,
                final_logit_softcapping=t.final_logit_softcapping,
                sliding_window=t.sliding_window,
                layer_types=t.layer_types,
            )
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "image_token_index": self.image_token_id,
            "hidden_size": t.hidden_size,
            "projection_dim": t.hidden_size,
            "vocab_size": t.vocab_size,
            "text_config": text,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
                "num_image_tokens": self.num_image_tokens,
                "projection_dim": t.hidden_size,
                "vision_use_head": False,
            },
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **text_or_vision: Any) -> "PaliGemmaConfig":
        """Copy with changed fields, e.g. `cfg.replace(text=dict(num_hidden_layers=2))`."""
        out = dataclasses.replace(self)
        out.vision = dataclasses.replace(self.vision, **text_or_vision.pop("vision", {}))
        out.text = dataclasses.replace(self.text, **text_or_vision.pop("text", {}))
        return dataclasses.replace(out, **text_or_vision)


def _side(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        if x[0] != x[-1]:
            raise ValueError(f"non-square size {x} is not supported")
        return int(x[0])
    return int(x)


def _first(x: Any) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6,
    max_position_embeddings=8192,
)
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
    max_position_embeddings=8192, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, sliding_window=4096,
)


# ---------------------------------------------------------------------------- presets
def _paligemma1(image_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=TextConfig())


def _paligemma2(image_size: int, size: str) -> PaliGemmaConfig:
    # (hidden, mlp, layers, heads, kv heads, head_dim, query_pre_attn_scalar) of Gemma 2 2B/9B/27B
    geometry = {
        "3b": (2304, 9216, 26, 8, 4, 256, 256),
        "10b": (3584, 14336, 42, 16, 8, 256, 256),
        "28b": (4608, 36864, 46, 32, 16, 128, 144),
    }[size]
    hidden, mlp, layers, heads, kv, head_dim, qpas = geometry
    text = TextConfig(
        model_type="gemma2", hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        query_pre_attn_scalar=qpas, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=text)


def tiny_vocab_size(base_vocab: int) -> tuple[int, int]:
    """(embedding rows, image token id) for a tokenizer with `base_vocab` ordinary tokens."""
    image_id = vocab.image_token_id(base_vocab)
    return -(-(image_id + 1) // 64) * 64, image_id


TINY_BASE_VOCAB = 512  # ordinary tokens of the tiny presets' tokenizer (bytes + a few words)


def _tiny(gemma2: bool) -> PaliGemmaConfig:
    vocab, image_id = tiny_vocab_size(TINY_BASE_VOCAB)
    vision = VisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14,
    )
    text = TextConfig(
        model_type="gemma2" if gemma2 else "gemma", vocab_size=vocab, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gemma2 else 1, head_dim=16, max_position_embeddings=512,
    )
    if gemma2:
        text.query_pre_attn_scalar = 24  # deliberately != head_dim, as at 28B
        text.attn_logit_softcapping = 50.0
        text.final_logit_softcapping = 30.0
        text.sliding_window = 16
        text.layer_types = ["sliding_attention", "full_attention"]
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=image_id)


PRESETS: dict[str, Any] = {
    "paligemma-tiny": lambda: _tiny(gemma2=False),
    "paligemma2-tiny": lambda: _tiny(gemma2=True),
    **{f"paligemma-3b-pt-{s}": (lambda s=s: _paligemma1(s)) for s in (224, 448, 896)},
    **{
        f"paligemma2-{size}-pt-{s}": (lambda s=s, size=size: _paligemma2(s, size))
        for size in ("3b", "10b", "28b")
        for s in (224, 448, 896)
    },
}
