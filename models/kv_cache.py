"""Key/value caches. Attention layers call `cache.update(layer, k, v, slot)` and attend to what
it returns, so the same decoder serves eager generation and the ONNX graphs.

* `StaticKVCache` (eager generation, gpt-fast style): buffers of the final length are allocated
  once and each step writes its keys at `slot`. Nothing is reallocated and the cost of a step does
  not grow with the number of tokens apart from the attention term, which covers the slots
  written so far (a view of the buffer).
* `ConcatKVCache` (the ONNX prefill/decode graphs): past keys come in as graph inputs and the
  step's keys are appended, so the graph's outputs are `[batch, kv_heads, past + new, head_dim]`
  tensors that an application feeds back in. Simple to drive, but every step copies the cache.
* `ScatterKVCache` (the ONNX decoder graph): fixed-length buffers come in and go out with the
  step's slots written (`torch.scatter`, an ONNX ScatterElements). ONNX Runtime writes them in
  place when the application binds each `present` output to its `past` input's memory, so a step
  copies nothing but its own keys, like `StaticKVCache`.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated `[batch, kv_heads, max_len, head_dim]` keys and values for every layer."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` `[B, Hkv, S, Dh]` at slots `slot .. slot+S-1`; return the filled part
        `[B, Hkv, slot+S, Dh]` (a view: no copy, and no attention over slots not yet written)."""
        end = slot + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; step writes up to {end}")
        self.k[layer][:, :, slot:end] = k
        self.v[layer][:, :, slot:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class ConcatKVCache:
    """Past keys/values in, past + new out (`present`), one entry per layer."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.past is not None:
            pk, pv = self.past[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.present.append((k, v))
        return k, v


class ScatterKVCache:
    """Buffers `[B, Hkv, T, Dh]` in; out the same buffers with slots `slots` `[S]` written."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], slots: torch.Tensor):
        self.past, self.slots = past, slots
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.past[layer]
        index = self.slots[None, None, :, None].expand_as(k)  # [B, Hkv, S, Dh]: slot of each new key
        # The output is the input buffer updated (nothing else reads the input), so a runtime that
        # aliases the two does the update in place.
        k, v = pk.scatter(2, index, k), pv.scatter(2, index, v)
        self.present.append((k, v))
        return k, v
