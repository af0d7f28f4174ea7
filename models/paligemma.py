"""PaliGemma: SigLIP -> linear projector -> Gemma decoder.

The processor writes `num_image_tokens` `<image>` placeholders at the start of the prompt; the
model replaces their embeddings with the projected image features (unscaled: only text
embeddings get Gemma's sqrt(hidden) factor) and runs the decoder under the prefix-LM mask.

    >>> import torch
    >>> from pgexport.models import PaliGemma, PaliGemmaConfig
    >>> model = PaliGemma(PaliGemmaConfig.from_preset("paligemma-tiny")).eval()
    >>> ids = torch.tensor([[model.cfg.image_token_id] * 16 + [2, 300, 301]])
    >>> model(ids, torch.zeros(1, 3, 56, 56)).shape
    torch.Size([1, 19, 1728])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pgexport.models.attention import prefix_lm_mask
from pgexport.models.config import PaliGemmaConfig
from pgexport.models.gemma import GemmaDecoder, RMSNorm
from pgexport.models.siglip import SiglipVisionTower


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """RoPE positions `[B, S]` that count real tokens only (1-based, as in transformers).

    Left or right padding gives every row the same positions as that prompt alone.
    """
    return attention_mask.long().cumsum(-1) + offset


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index `[B]` of each row's last real token, for left or right padding."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * slots).argmax(-1)


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = GemmaDecoder(cfg.text)

    # ------------------------------------------------------------------ building blocks
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values `[B, 3, H, W]` -> image features `[B, num_image_tokens, text_hidden]`."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[B, S, D]` with image features written over the `<image>` slots."""
        is_image = input_ids == self.cfg.image_token_id  # [B, S]
        # `<image>` rows of the table are never used (the features replace them), and a config may put the
        # id at or past the end of the table: look up pad there instead.
        x = self.language_model.embed(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        if image_features is not None:
            feats = image_features.to(x.dtype)  # [B, N, D]
            # The k-th `<image>` token of a row takes the k-th feature of that row's image.
            index = (is_image.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
            gathered = torch.gather(feats, 1, index[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.where(is_image[..., None], gathered, x)
        return x

    def masks(self, q_slots, kv_valid, kv_prefix, q_prefix) -> dict:
        """One mask per distinct window in the decoder (None = global attention)."""
        windows = {layer.window for layer in self.language_model.layers}
        return {w: prefix_lm_mask(q_slots, kv_valid, kv_prefix, q_prefix, w) for w in windows}

    # ------------------------------------------------------------------ full forward
    def forward(
        self,
        input_ids,  # [B, S] int, `<image>` placeholders where the image goes
        pixel_values=None,  # [B, 3, H, W] float, or None for text only
        attention_mask=None,  # [B, S] 1 = real token, 0 = padding
        token_type_ids=None,  # [B, S] 0 = prefix (bidirectional), 1 = suffix (causal)
        image_features=None,  # [B, N, D] instead of pixel_values, if already encoded
        logits_at=None,  # [B, S] bool: compute the logits only there, returned as [n, vocab]
    ) -> torch.Tensor:
        """Logits `[B, S, vocab]` for every position (training and scoring).

        `logits_at` selects positions (e.g. the suffix, for the training loss): the tied head is
        the widest matmul of the model (257216 columns at 3B), and the prefix's logits are unused.

        Without `token_type_ids` every real token is prefix, as at inference: the image and
        the whole prompt see each other. Accepts numpy arrays as the processor returns them.
        """
        input_ids = as_tensor(input_ids, torch.long, self.device)
        B, S = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else as_tensor(attention_mask, torch.long, self.device)
        is_prefix = attention_mask.bool() if token_type_ids is None else (as_tensor(token_type_ids, torch.long, self.device) == 0) & attention_mask.bool()
        if image_features is None and pixel_values is not None:
            image_features = self.encode_image(as_tensor(pixel_values, self.dtype, self.device))
        x = self.embed(input_ids, image_features)
        slots = torch.arange(S, device=self.device)
        masks = self.masks(slots, attention_mask.bool(), is_prefix, is_prefix)
        hidden = self.language_model(x, positions_from_mask(attention_mask), masks)  # [B, S, D]
        if logits_at is not None:
            hidden = hidden[as_tensor(logits_at, torch.bool, self.device)]  # [n, D]
        return self.language_model.logits(hidden)

    @classmethod
    def random(cls, cfg: PaliGemmaConfig, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02) -> "PaliGemma":
        """A model with seeded random weights (what `pgexport init` saves), built in one copy.

        Matrices and embeddings ~ N(0, std), biases 0, LayerNorm scale 1, RMSNorm weight 0
        (Gemma's norms multiply by 1 + w, so 0 is the identity).
        """
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu").to(dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    module.weight.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=g)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear.weight.dtype


def as_tensor(x, dtype, device) -> torch.Tensor:
    """NumPy, list or tensor input -> a tensor of `dtype` on `device` (callers pass either)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return torch.as_tensor(x, device=device).to(dtype)
