"""The decoding loop and token selection, shared by every backend (numpy only, no torch).

A backend supplies a *stepper*: `prefill(input_ids, attention_mask, pixel_values)` runs the vision
tower once and the whole prompt, `decode(tokens)` feeds one token per row; both return the
next-token logits `[B, vocab]` as numpy. The eager PyTorch model, the ONNX Runtime graphs and the
quantized variants all plug into `generate_tokens`, so they pick tokens the same way and a seed
gives the same samples on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np


class Stepper(Protocol):
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray) -> np.ndarray: ...


@dataclass
class Sampling:
    """Token selection. `do_sample=False` is greedy (argmax); the rest only apply when sampling."""

    do_sample: bool = False
    temperature: float = 1.0  # < 1 sharpens, > 1 flattens the distribution
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p (nucleus)
    seed: int | None = None  # same seed, same logits -> same tokens

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def select_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from logits `[B, V]` -> `[B]` int64."""
    if not sampling.do_sample:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return (np.cumsum(probs, -1) < u).sum(-1).clip(max=probs.shape[-1] - 1).astype(np.int64)


def iter_tokens(
    stepper: Stepper,
    input_ids: np.ndarray,  # [B, S]
    attention_mask: np.ndarray,  # [B, S]
    pixel_values: np.ndarray,  # [B, 3, H, W]
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    sampling: Sampling | None = None,
) -> Iterator[np.ndarray]:
    """The tokens `[B]` of each step, yielded as soon as they are chosen (before the next step
    runs); rows that hit eos get `pad_token_id` afterwards. Stops when every row has hit eos or
    after `max_new_tokens`; a consumer that stops iterating (or calls `close()`) stops decoding.

    >>> for tokens in iter_tokens(stepper, ids, mask, pixels, 32, eos, pad):  # doctest: +SKIP
    ...     print(tokens)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or Sampling()
    rng = np.random.default_rng(sampling.seed)
    logits = stepper.prefill(input_ids, attention_mask, pixel_values, max_new_tokens)
    finished = np.zeros(input_ids.shape[0], dtype=bool)
    for step in range(max_new_tokens):
        tokens = np.where(finished, pad_token_id, select_tokens(logits, sampling, rng))
        yield tokens
        finished |= tokens == eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            return
        logits = stepper.decode(tokens)


def generate_tokens(stepper: Stepper, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
                    max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                    sampling: Sampling | None = None) -> np.ndarray:
    """New tokens `[B, n]` (n <= max_new_tokens); rows that hit eos are padded after it.
    The arguments are `iter_tokens`'."""
    steps = iter_tokens(stepper, input_ids, attention_mask, pixel_values, max_new_tokens, eos_token_id,
                        pad_token_id, sampling)
    return np.stack(list(steps), axis=1)
