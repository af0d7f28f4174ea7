"""Prefix-LM attention masks and the attention kernel shared by Gemma and Gemma 2.

PaliGemma is trained as a prefix-LM: the image tokens and the text prefix ("caption en\\n")
form one block in which every token sees every other token in both directions; the suffix
(the answer, and every generated token) is causal. Padding is never attended to.

Masks are boolean, `True` = may attend, shaped `[B, 1, S, T]` for S queries over T key slots.
Slots are positions in the KV buffer (padding included); RoPE positions are separate and count
real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_lm_mask(
    q_slots: torch.Tensor,  # [S] slot of each query in the KV buffer
    kv_valid: torch.Tensor,  # [B, T] bool: slot holds a real (non-padding) token
    kv_prefix: torch.Tensor,  # [B, T] bool: slot belongs to the bidirectional prefix
    q_prefix: torch.Tensor,  # [B, S] bool: query belongs to the prefix
    window: int | None = None,  # Gemma 2 sliding layers: see at most `window` real tokens back
) -> torch.Tensor:
    """Boolean mask `[B, 1, S, T]` combining causal, sliding-window, prefix and padding rules.

    Same rule as transformers: ((causal and in-window) or both-in-prefix) and key-is-real.

    >>> m = prefix_lm_mask(torch.arange(3), torch.ones(1, 3, dtype=torch.bool),
    ...                    torch.tensor([[1, 1, 0]]).bool(), torch.tensor([[1, 1, 0]]).bool())
    >>> m[0, 0].int().tolist()   # tokens 0,1 are prefix (see each other), token 2 is causal
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    kv_slots = torch.arange(kv_valid.shape[1], device=kv_valid.device)
    diff = q_slots[:, None] - kv_slots[None, :]  # [S, T] how far back each key is, in slots
    causal = (diff >= 0)[None]  # [1, S, T]
    if window is not None:
        # The window counts tokens, not slots: padding inside the buffer (right padding, or a
        # padded row's generated tokens) must not take the place of real tokens. A row then
        # attends exactly as it would alone.
        kv_pos = kv_valid.long().cumsum(-1)  # [B, T] real tokens up to and including each slot
        q_pos = kv_pos[:, q_slots]  # [B, S]
        causal = causal & ((q_pos[:, :, None] - kv_pos[:, None, :]) < window)  # [B, S, T]
    bidirectional = q_prefix[:, :, None] & kv_prefix[:, None, :]  # [B, S, T]
    allowed = (causal | bidirectional) & kv_valid[:, None, :]
    # A padding query would otherwise see nothing, and an empty softmax row is NaN, which
    # would leak into later layers through its keys/values. Let every query see itself.
    allowed = allowed | (diff == 0)[None]
    return allowed[:, None]


# CPU training: the explicit path up to this many scores per head (a 1024-token sequence; at
# 2 + 4 + 2 bytes each for bf16 scores, fp32 probabilities and bf16 probabilities: 8 MiB per head
# and layer, kept for the backward pass).
EXPLICIT_MAX_SCORES = 1024 * 1024


def attention(
    q: torch.Tensor,  # [B, H, S, Dh]
    k: torch.Tensor,  # [B, Hkv, T, Dh]
    v: torch.Tensor,  # [B, Hkv, T, Dh]
    mask: torch.Tensor | None,  # [B, 1, S, T] bool, or None: every query sees every key
    scale: float | None,  # None: head_dim ** -0.5
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads and optional Gemma 2 logit soft-cap.

    Eager fp32/bf16 without soft-cap use PyTorch's SDPA (`enable_gqa`). The exported graphs take
    the explicit path below and fold the KV group into the query length, which every ONNX runtime
    can run: the ONNX decomposition of SDPA transposes the key cache into a new tensor and scales
    it at every step (two copies of the whole cache per layer and token), while `q @ k^T` becomes a
    MatMul that ONNX Runtime fuses with the transpose into one GEMM reading the cache where it
    lies. fp16 always takes the explicit path with the scores in fp32: the query is scaled before
    the product so the fp16 scores stay in range, and the soft-cap, mask and softmax run in fp32
    (an fp16 softmax is what an exported fp16 SDPA would otherwise compute). Training on the CPU also takes the explicit path while the scores
    are small (S x T <= EXPLICIT_MAX_SCORES): there PyTorch's SDPA picks its flash kernel, whose
    CPU backward is much slower than matmul-softmax-matmul at such shapes
    (benchmarks/bench_attention.py, bench_train_step.py). Longer sequences keep SDPA, which does
    not store the [S, T] probabilities of every head for the backward pass.
    """
    B, H, S, Dh = q.shape
    groups = H // k.shape[1]
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    exporting = torch.compiler.is_exporting()
    explicit = (softcap is not None or exporting
                or (training and q.device.type == "cpu" and S * k.shape[2] <= EXPLICIT_MAX_SCORES))
    if groups > 1 and q.dtype != torch.float16 and not explicit:
        # Eager fast path: SDPA maps query head h to KV head h // groups itself (no copy of the
        # cache) and keeps the small [B, 1, S, T] boolean mask, as transformers does.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if groups > 1:
        # Multi-query / grouped-query: query head h uses KV head h // groups. Folding the
        # group into the query length lets all its heads share one KV head without copying
        # the cache: [B, H, S, Dh] -> [B, Hkv, groups * S, Dh], mask rows repeated to match.
        q = q.reshape(B, k.shape[1], groups * S, Dh)
        if mask is not None:
            mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * S, mask.shape[-1])
    if q.dtype != torch.float16 and not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(B, H, S, Dh)
    scale = Dh**-0.5 if scale is None else scale
    if q.dtype == torch.float16:  # scale the query first so the fp16 product stays in range, then fp32
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # [B, Hkv, groups * S, T]
    elif exporting:  # scaling the small query, not the scores or the cache
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
    else:  # CPU training, or Gemma 2, whose soft-cap (tanh of the raw scores) SDPA cannot express
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # fp32 for fp16/bf16
    out = torch.matmul(probs.to(q.dtype), v)
    return out.reshape(B, H, S, Dh)
