"""The engine's KV cache: `max_batch` rows of `max_len` slots per layer, allocated once.

Every active row writes its next token at one shared slot, `write_slot` (decoder.onnx takes one
`cache_position` for the whole batch). A request that joins is prefilled so that its prompt ENDS
at that slot: RoPE positions and the prefix-LM mask are derived from each row's attention mask
(real tokens counted), so where a row's tokens sit in the buffer does not change its numbers.

    row 0  . . . P P P P P P d d d d _      P: prompt   d: decoded tokens
    row 1  . . . . . . P P P P P P d d _    _: write_slot, the same for every row
    row 2  . P P P P P P d d d d d d d _    .: free (stale values, masked out)

Active rows are kept packed at the front (rows 0 .. n-1), so a decode step runs on exactly the
active rows: the graph is bound to the first n rows of each buffer, which are contiguous.
When `write_slot` reaches the end, the rows move left together by the free space in front of
the oldest one (`compact`); a row whose request fits `max_len` always leaves some, so a request
that fits is never refused for lack of room.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVRows:
    def __init__(self, num_buffers: int, max_batch: int, kv_heads: int, max_len: int, head_dim: int, dtype):
        shape = (max_batch, kv_heads, max_len, head_dim)
        # Zeroed: masked slots are weighted 0, and 0 times the NaN of uninitialised memory is NaN.
        self.buffers = [np.zeros(shape, dtype) for _ in range(num_buffers)]  # [max_batch, Hkv, max_len, Dh] each
        self.mask = np.zeros((max_batch, max_len), np.int64)  # 1 where a row holds a real token
        self.max_batch, self.max_len = max_batch, max_len
        self.active = 0  # rows 0 .. active-1 hold requests
        self.write_slot = 0  # where the next decode step writes, for every active row

    def views(self, start: int, stop: int) -> list[ort.OrtValue]:
        """Rows start..stop-1 of every buffer as OrtValues sharing the memory (decoder.onnx writes
        them in place)."""
        return [ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]

    def oldest_start(self) -> int:
        """The first slot any active row uses (write_slot when none is active)."""
        if not self.active:
            return self.write_slot
        used = self.mask[:self.active, :self.write_slot].any(axis=0)
        return int(used.argmax()) if used.any() else self.write_slot

    def shift(self, delta: int) -> None:
        """Move the active rows' slots by `delta` (negative: left), keeping every row's order."""
        if not delta:
            return
        lo, hi, n = self.oldest_start(), self.write_slot, self.active
        if lo + delta < 0 or hi + delta > self.max_len:
            raise ValueError(f"cannot shift slots {lo}..{hi} by {delta} in a buffer of {self.max_len}")
        for b in self.buffers:
            b[:n, :, lo + delta:hi + delta] = b[:n, :, lo:hi].copy()
        self.mask[:n, lo + delta:hi + delta] = self.mask[:n, lo:hi].copy()
        # The slots left behind are masked out (their stale values stay; they are never read).
        if delta > 0:
            self.mask[:n, lo:lo + delta] = 0
        else:
            self.mask[:n, hi + delta:hi] = 0
        self.write_slot += delta

    def compact(self) -> int:
        """Move every active row left by the free space before the oldest; returns the slots freed."""
        free = self.oldest_start()
        self.shift(-free)
        return free

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (cache and mask) into row `dst` (to keep the active rows packed)."""
        if src != dst:
            for b in self.buffers:
                b[dst] = b[src]
            self.mask[dst] = self.mask[src]
