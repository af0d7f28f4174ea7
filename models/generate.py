"""Eager PyTorch generation with a static KV cache.

`EagerStepper` implements the two steps the shared generation loop
(`pgexport.runtime.generation.generate_tokens`, used by `pgexport.eager.generate`) drives:

* prefill: the vision tower runs once, the whole prompt goes through the decoder under the
  prefix-LM mask and writes its keys/values at slots `0 .. S-1` of a cache sized for
  `S + max_new_tokens`; the logits of each row's last real token come back.
* decode: one token per row is written at the next slot. Its RoPE position counts the row's real
  tokens only, so left or right padding does not change what a row generates.
"""

from __future__ import annotations

import numpy as np
import torch

from pgexport.models.kv_cache import StaticKVCache
from pgexport.models.paligemma import PaliGemma, as_tensor, last_token_index, positions_from_mask


class EagerStepper:
    """Prefill / decode steps of one generation over `model` (a new stepper per generation)."""

    def __init__(self, model: PaliGemma):
        self.model = model

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> np.ndarray:
        m, cfg = self.model, self.model.cfg
        ids = as_tensor(input_ids, torch.long, m.device)
        mask = as_tensor(attention_mask, torch.long, m.device)
        B, S = ids.shape
        T = S + max_new_tokens
        if T > cfg.text.max_position_embeddings:
            raise ValueError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds the context of {cfg.text.max_position_embeddings} tokens")
        t = cfg.text
        self.cache = StaticKVCache(t.num_hidden_layers, B, t.num_key_value_heads, T, t.head_dim, m.dtype, m.device)
        # Which slots hold real tokens, and which of those are the (bidirectional) prefix.
        self.kv_valid = torch.zeros(B, T, dtype=torch.bool, device=m.device)
        self.kv_valid[:, :S] = mask.bool()
        self.kv_prefix = self.kv_valid.clone()  # the whole prompt is prefix
        self.num_real = mask.sum(-1)  # [B]
        self.slot = self.prompt_len = S

        features = m.encode_image(as_tensor(pixel_values, m.dtype, m.device)) if pixel_values is not None else None
        x = m.embed(ids, features)
        masks = m.masks(torch.arange(S, device=m.device), self.kv_valid[:, :S], self.kv_prefix[:, :S], mask.bool())
        hidden = m.language_model(x, positions_from_mask(mask), masks, self.cache, slot=0)  # [B, S, D]
        return self._logits(hidden[torch.arange(B), last_token_index(mask)])

    @torch.inference_mode()
    def decode(self, tokens) -> np.ndarray:
        m = self.model
        ids = as_tensor(tokens, torch.long, m.device)[:, None]  # [B, 1]
        slot = self.slot
        self.kv_valid[:, slot] = True
        positions = (self.num_real + 1 + (slot - self.prompt_len))[:, None]  # 1-based, real tokens only
        no_prefix = torch.zeros_like(ids, dtype=torch.bool)
        end = slot + 1  # keys attended: the slots written so far
        masks = m.masks(torch.tensor([slot], device=m.device), self.kv_valid[:, :end], self.kv_prefix[:, :end], no_prefix)
        hidden = m.language_model(m.embed(ids), positions, masks, self.cache, slot=slot)
        self.slot += 1
        return self._logits(hidden[:, -1])

    def _logits(self, hidden: torch.Tensor) -> np.ndarray:
        return self.model.language_model.logits(hidden).float().cpu().numpy()
