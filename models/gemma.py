"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder.

One class serves both; `TextConfig.is_gemma2` switches on what Gemma 2 adds:
  * attention scale `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5`,
  * tanh soft-capping of attention scores (50) and of the final logits (30),
  * a norm after attention and after the MLP (four norms per layer instead of two),
  * sliding-window attention on every other layer.

Parameter names follow Hugging Face so that checkpoints load by a prefix rename. Note that in
Gemma 1 `post_attention_layernorm` is the norm *before* the MLP; in Gemma 2 it is applied to the
attention output and `pre_feedforward_layernorm` is the norm before the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgexport.models.attention import attention
from pgexport.models.config import TextConfig


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in fp32. The weight starts at zero (identity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)  # scale before the cast, as Gemma does


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[B, 1, S, head_dim]` for integer `positions` `[B, S]` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, head_dim/2]: angle of each pair
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # half-split layout: pair i is (i, i + d/2)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping if cfg.is_gemma2 else None
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, slot: int = 0):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # keys of earlier steps (and this one), [B, Hkv, T, Dh]
            k, v = cache.update(self.layer_idx, k, v, slot)
        out = attention(q, k, v, mask, self.scale, self.softcap)  # [B, H, S, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class GemmaMLP(nn.Module):
    """Gated GELU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.is_gemma2 = cfg.is_gemma2
        self.window = cfg.layer_window(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_gemma2:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, slot: int = 0):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot)
        if not self.is_gemma2:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaDecoder(nn.Module):
    """Embedding table, decoder layers and final norm. The LM head is the embedding, transposed."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Gemma scales text embeddings by sqrt(hidden); the constant is rounded to the weight
        # dtype first (in bf16 sqrt(2048) = 45.25), exactly as the reference does.
        scale = torch.tensor(self.cfg.hidden_size**0.5, dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(input_ids) * scale

    def forward(self, x, positions, masks, cache=None, slot: int = 0):
        """x `[B, S, D]`, positions `[B, S]`, masks {window: [B, 1, S, T]} -> hidden `[B, S, D]`."""
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, masks[layer.window], cache, slot)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tied head (and Gemma 2's soft-cap). `out_dtype=torch.float32` casts the raw logits
        first, so that an fp16 model soft-caps and returns them in fp32 (the ONNX graphs do)."""
        logits = F.linear(hidden, self.embed_tokens.weight)  # tied head: [.., D] -> [.., V]
        if out_dtype is not None:
            logits = logits.to(out_dtype)
        cap = self.cfg.final_logit_softcapping if self.cfg.is_gemma2 else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
