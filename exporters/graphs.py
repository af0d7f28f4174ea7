"""The three ONNX graphs, as thin wrappers around the eager `PaliGemma` modules.

Each wrapper holds the *same* model object that runs eagerly and calls its building blocks
(`encode_image`, `embed`, `masks`, `language_model(...)` with a `ConcatKVCache`,
`language_model.logits`), so the traced graphs cannot drift from the eager numerics.

    vision_encoder.onnx  pixel_values [batch, 3, size, size] float32
                         -> image_features [batch, num_image_tokens, hidden]
    prefill.onnx         input_ids [batch, seq] int64 (with `<image>` ids), image_features,
                         attention_mask [batch, seq] int64
                         -> logits [batch, vocab] float32 (last real token of each row),
                            present.{i}.key|value [batch, kv_heads, seq, head_dim]
    decode.onnx          input_ids [batch, 1], attention_mask [batch, past + 1],
                         past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
                         -> logits [batch, vocab] float32, present.{i}.key|value [.., past + 1, ..]
    decoder.onnx         input_ids [batch, seq], image_features [batch, n, hidden] (n may be 0),
                         attention_mask [batch, max_len], token_type_ids [batch, seq],
                         cache_position [seq] int64 (the buffer slots the new tokens go to),
                         past_key_values.{i}.key|value [batch, kv_heads, max_len, head_dim]
                         -> logits [batch, vocab] float32 (last real token of the new tokens),
                            present.{i}.key|value: the same buffers, slots `cache_position` written

`decoder.onnx` is prefill and decode in one graph over a KV cache allocated once, so a runtime
holds (and prepacks) the decoder weights once and no step copies the cache: each `present` output
is its `past` input with the new slots scattered in (ScatterElements), which ONNX Runtime does in
place when both are bound to the same memory (I/O binding). Prefill is `cache_position`
0..seq-1 with `token_type_ids` 0 (the prompt is the bidirectional prefix), decode is one token
at the next slot with `token_type_ids` 1 (causal) and no image features. `attention_mask` covers
the whole buffer: 1 for the real tokens written so far and those of this call, 0 for padding and
for slots not written yet. Other `token_type_ids` give any prefix-LM split, e.g. a prompt and a
suffix to score in one call.

`pixel_values` and `logits` are float32 in every export; `image_features` and the keys/values
have the weights' dtype (float16 in an fp16 export, so the cache takes half the memory).

Prefill treats the whole prompt as the bidirectional prefix (padding excluded). Decode has no
prefix: its token is causal, at query slot `past`, with RoPE position `attention_mask.sum(-1)`
(1-based count of real tokens), and Gemma 2 sliding layers count their window in real tokens. Left and
right padding both work because positions, masks and the last-token index all derive from
`attention_mask`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.export import Dim

from pgexport.models.kv_cache import ConcatKVCache, ScatterKVCache
from pgexport.models.paligemma import PaliGemma, last_token_index, positions_from_mask

# Symbolic axis names, shared by the graphs (they end up as dim_param in the ONNX files).
BATCH = "batch"
SEQ = "sequence_length"
PAST = "past_sequence_length"
MAX_LEN = "max_sequence_length"  # the decoder graph's cache buffers

VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["image_features"]
PREFILL_INPUTS = ["input_ids", "image_features", "attention_mask"]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def prefill_outputs(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


def decode_inputs(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", *past_names(num_layers)]


def decode_outputs(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


def decoder_inputs(num_layers: int) -> list[str]:
    return ["input_ids", "image_features", "attention_mask", "token_type_ids", "cache_position", *past_names(num_layers)]


def _run_decoder(m: PaliGemma, x: torch.Tensor, positions: torch.Tensor, masks: dict, cache, slot,
                 rows: torch.Tensor) -> tuple:
    """The decoder over new embeddings `x` [B, S, D] with `cache` -> (logits of token `rows` [B]
    of each row, then present key / value per layer)."""
    hidden = m.language_model(x, positions, masks, cache, slot=slot)
    logits = m.language_model.logits(_gather_rows(hidden, rows), out_dtype=torch.float32)
    return (logits, *[t for kv in cache.present for t in kv])


def _pairs(past_key_values: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)]


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden `[B, S, D]`, index `[B]` -> `[B, D]` (same values as `hidden[arange(B), index]`)."""
    return torch.gather(hidden, 1, index[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]


class VisionEncoderGraph(nn.Module):
    """pixel_values -> image_features (SigLIP + projector)."""

    input_names = VISION_INPUTS
    output_names = VISION_OUTPUTS

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def example_inputs(self, batch: int = 2) -> tuple:
        v = self.model.cfg.vision
        # float32 pixels whatever the weights' dtype: the patch embedding casts them (a Cast node
        # in an fp16 graph), so every export takes what the processor produces.
        return (torch.zeros(batch, v.num_channels, v.image_size, v.image_size, dtype=torch.float32),)

    def dynamic_shapes(self) -> dict:
        return {"pixel_values": {0: Dim(BATCH)}}

    def traced_config(self) -> dict:
        """What this graph's trace depends on (`trace_cache.trace_key`): the vision tower and the
        projector's output width. Models that differ only in their decoder share one trace."""
        cfg = self.model.cfg
        return {"vision": dataclasses.asdict(cfg.vision), "projector_out": cfg.text.hidden_size}


class PrefillGraph(nn.Module):
    """The whole prompt (bidirectional prefix) -> last-token logits and the KV cache."""

    input_names = PREFILL_INPUTS

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model
        self.output_names = prefill_outputs(model.cfg.text.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor, attention_mask: torch.Tensor):
        m = self.model
        x = m.embed(input_ids, image_features)
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = attention_mask.bool()  # every real token is prefix; padding is neither
        masks = m.masks(slots, real, real, real)
        return _run_decoder(m, x, positions_from_mask(attention_mask), masks, ConcatKVCache(), 0,
                            last_token_index(attention_mask))

    def example_inputs(self, batch: int = 2, text_len: int = 5) -> tuple:
        cfg = self.model.cfg
        n = cfg.num_image_tokens
        ids = torch.full((batch, n + text_len), 3, dtype=torch.long)
        ids[:, :n] = cfg.image_token_id
        mask = torch.ones_like(ids)
        feats = torch.zeros(batch, n, cfg.text.hidden_size, dtype=self.model.dtype)
        return ids, feats, mask

    def dynamic_shapes(self) -> dict:
        batch, seq = Dim(BATCH), Dim(SEQ)
        return {
            "input_ids": {0: batch, 1: seq},
            "image_features": {0: batch},
            "attention_mask": {0: batch, 1: seq},
        }


class _CachedGraph(nn.Module):
    """A decoder graph that takes the past keys/values: logits and the grown cache out."""

    def __init__(self, model: PaliGemma, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = decode_outputs(model.cfg.text.num_hidden_layers)


class DecodeGraph(_CachedGraph):
    """One new token per row, past keys/values in, past + 1 out."""

    def __init__(self, model: PaliGemma):
        super().__init__(model, decode_inputs(model.cfg.text.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: list[torch.Tensor]):
        m = self.model
        past = _pairs(past_key_values)
        past_len = past[0][0].shape[2]
        q_slots = torch.arange(past_len, past_len + 1, device=input_ids.device)  # [1]: the new slot
        real = attention_mask.bool()  # [B, past + 1]
        no_prefix_kv = torch.zeros_like(real)
        no_prefix_q = torch.zeros_like(input_ids, dtype=torch.bool)
        masks = m.masks(q_slots, real, no_prefix_kv, no_prefix_q)
        positions = attention_mask.long().sum(-1, keepdim=True)  # [B, 1], 1-based real-token count
        last = torch.zeros_like(input_ids[:, 0])  # the one new token
        return _run_decoder(m, m.embed(input_ids), positions, masks, ConcatKVCache(past), past_len, last)

    def example_inputs(self, batch: int = 2, past: int = 7) -> tuple:
        t = self.model.cfg.text
        ids = torch.full((batch, 1), 3, dtype=torch.long)
        mask = torch.ones(batch, past + 1, dtype=torch.long)
        shape = (batch, t.num_key_value_heads, past, t.head_dim)
        kv = [torch.zeros(shape, dtype=self.model.dtype) for _ in range(2 * t.num_hidden_layers)]
        return ids, mask, kv

    def dynamic_shapes(self) -> dict:
        batch, past = Dim(BATCH), Dim(PAST)
        n = self.model.cfg.text.num_hidden_layers
        return {
            "input_ids": {0: batch},
            "attention_mask": {0: batch, 1: past + 1},
            "past_key_values": [{0: batch, 2: past} for _ in range(2 * n)],
        }


class DecoderGraph(_CachedGraph):
    """Prefill and decode in one graph: new tokens (prefix or causal) written into a fixed-length cache."""

    def __init__(self, model: PaliGemma):
        super().__init__(model, decoder_inputs(model.cfg.text.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, cache_position: torch.Tensor, past_key_values: list[torch.Tensor]):
        m = self.model
        # One zero row after the features, so that the gather in `embed` has a row to read when
        # there are no image features (decode): rows without `<image>` tokens never use it.
        feats = torch.cat([image_features, image_features.new_zeros(image_features.shape[0], 1, image_features.shape[2])], 1)
        x = m.embed(input_ids, feats)
        real = attention_mask.bool()  # [B, T]: slots holding real tokens, this call's included
        new_real = real[:, cache_position]  # [B, S]
        q_prefix = (token_type_ids == 0) & new_real  # the new tokens that are prefix
        # Earlier slots are never prefix of a new query: they all precede it, so causality covers them.
        kv_prefix = torch.zeros_like(real).scatter(1, cache_position[None].expand_as(q_prefix), q_prefix)  # [B, T]
        masks = m.masks(cache_position, real, kv_prefix, q_prefix)
        positions = positions_from_mask(attention_mask)[:, cache_position]  # [B, S], real tokens counted from the start
        cache = ScatterKVCache(_pairs(past_key_values), cache_position)
        return _run_decoder(m, x, positions, masks, cache, cache_position, last_token_index(new_real))

    def example_inputs(self, batch: int = 2, past: int = 7, text_len: int = 5, free: int = 3) -> tuple:
        cfg = self.model.cfg
        t = cfg.text
        n = cfg.num_image_tokens
        ids = torch.full((batch, n + text_len), 3, dtype=torch.long)
        ids[:, :n] = cfg.image_token_id
        feats = torch.zeros(batch, n, t.hidden_size, dtype=self.model.dtype)
        end = past + n + text_len
        mask = torch.zeros(batch, end + free, dtype=torch.long)  # `free` slots not written yet
        mask[:, :end] = 1
        token_type = torch.zeros_like(ids)
        cache_position = torch.arange(past, end)
        shape = (batch, t.num_key_value_heads, end + free, t.head_dim)
        kv = [torch.zeros(shape, dtype=self.model.dtype) for _ in range(2 * t.num_hidden_layers)]
        return ids, feats, mask, token_type, cache_position, kv

    @property
    def axis_names(self) -> dict:
        """Readable names for the symbols torch.export invents: (input name, axis) -> name. The
        value buffers are named too: their length only meets the mask's through a MatMul, which
        torch.export does not turn into an equality, so it gives them symbols of their own."""
        n = self.model.cfg.text.num_hidden_layers
        return {("input_ids", 0): BATCH, ("input_ids", 1): SEQ, ("image_features", 0): BATCH,
                ("image_features", 1): "num_image_features", ("attention_mask", 1): MAX_LEN,
                **{(f"past_key_values.{i}.value", 2): MAX_LEN for i in range(n)}}

    def dynamic_shapes(self) -> dict:
        # Dim.DYNAMIC lets torch.export derive which axes are equal from the graph itself.
        n = self.model.cfg.text.num_hidden_layers
        dyn = Dim.DYNAMIC
        return {
            "input_ids": {0: dyn, 1: dyn},
            "image_features": {0: dyn, 1: dyn},
            "attention_mask": {0: dyn, 1: dyn},
            "token_type_ids": {0: dyn, 1: dyn},
            "cache_position": {0: dyn},
            "past_key_values": [{0: dyn, 2: dyn} for _ in range(2 * n)],
        }
