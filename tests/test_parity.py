"""Numerical parity of the from-scratch model with transformers (the reference), fp32.

Every test runs on tiny random checkpoints written by transformers' `save_pretrained` and read
by our `load_checkpoint` (see conftest.py for the variants and the weight init).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from conftest import make_prompts, pad_batch, prompt_ids, random_pixels
from pgexport.runtime.generation import Sampling
from pgexport.models.attention import prefix_lm_mask
from pgexport.eager.generate import generate
from pgexport.models.generate import EagerStepper

LOGIT_ATOL = 1e-4
MAX_NEW = 20

# Variants for the HF parity tests: Gemma 1 / 2, 1 / 2 / 4 KV heads, query_pre_attn_scalar !=
# head_dim, head_dim != hidden / heads, sliding windows (16, 5) shorter than the sequence,
# 56 / 84 / 112 px images.
PARITY_VARIANTS = ["pg1", "pg1-kv2", "pg1-img84", "pg2", "pg2-kv1-win5", "pg2-mha-3l", "pg2-img112"]
# Padding must not change what a row generates, sliding windows included: the window counts
# real tokens, not KV slots (tests/test_sliding_window.py checks the logits against
# transformers on each row alone).
BATCH_VARIANTS = PARITY_VARIANTS + ["pg2-nowin"]


def real_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over the real (mask == 1) positions of `[B, S, V]` logits."""
    return (a.float() - b.float()).abs()[mask.bool()].max().item()


def hf_logits(hf, ids, pixels, mask, token_type_ids):
    # Our RoPE positions count real tokens only (1-based); transformers takes them as given.
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                  token_type_ids=token_type_ids, position_ids=mask.long().cumsum(-1)).logits


def hf_greedy(hf, ids, pixels, mask, max_new_tokens=MAX_NEW) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                          token_type_ids=torch.zeros_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens)
    return out[:, ids.shape[1]:].numpy()


def assert_varied(tokens: np.ndarray) -> None:
    """Guard against a degenerate random model (one token repeated makes parity meaningless)."""
    assert len(set(tokens.ravel().tolist())) >= 10, f"random model generates degenerate text: {tokens.tolist()}"


# ----------------------------------------------------------------------------- full forward
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_logits_match_transformers(hf_model_pair, record_diff, variant, side):
    """Two prompts of different lengths, padded, whole prompt as prefix (token_type_ids 0)."""
    hf, ours, cfg = hf_model_pair(variant)
    ids, mask = make_prompts(cfg, [5, 2], side=side)
    pixels = random_pixels(cfg, 2)
    tt = torch.zeros_like(ids)
    ref = hf_logits(hf, ids, pixels, mask, tt)
    with torch.no_grad():
        out = ours(ids, pixels, mask, tt)
        out_default = ours(ids, pixels, mask)  # token_type_ids=None means "all prefix"
    assert out.shape == ref.shape == (2, ids.shape[1], cfg.text.vocab_size)
    d = real_max_diff(out, ref, mask)
    record_diff("logits", d)
    assert d <= LOGIT_ATOL
    assert torch.equal(out[mask.bool()], out_default[mask.bool()])


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_suffix_logits_match_transformers(hf_model_pair, record_diff, variant):
    """Prefix + causal suffix (token_type_ids 1 on the suffix), as in training, left padded."""
    hf, ours, cfg = hf_model_pair(variant)
    g = torch.Generator().manual_seed(5)
    rows, types = [], []
    for prefix_len, suffix_len in [(4, 6), (1, 3)]:
        prefix = prompt_ids(cfg, prefix_len, g)
        suffix = torch.randint(3, 500, (suffix_len,), generator=g).tolist() + [cfg.eos_token_id]
        rows.append(prefix + suffix)
        types.append([0] * len(prefix) + [1] * len(suffix))
    ids, mask = pad_batch(rows, cfg.pad_token_id, "left")
    tt, _ = pad_batch(types, 0, "left")
    pixels = random_pixels(cfg, 2)
    ref = hf_logits(hf, ids, pixels, mask, tt)
    with torch.no_grad():
        out = ours(ids, pixels, mask, tt)
        all_prefix = ours(ids, pixels, mask, torch.zeros_like(tt))
    d = real_max_diff(out, ref, mask)
    record_diff("logits (suffix)", d)
    assert d <= LOGIT_ATOL
    # The suffix really is causal: treating it as prefix changes the prefix logits.
    assert real_max_diff(out, all_prefix, mask) > 1e-2


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_greedy_matches_transformers(hf_model_pair, variant):
    """20 greedy tokens for a left-padded batch of two prompts, identical to `hf.generate`."""
    hf, ours, cfg = hf_model_pair(variant)
    ids, mask = make_prompts(cfg, [5, 2], side="left")
    pixels = random_pixels(cfg, 2)
    ref = hf_greedy(hf, ids, pixels, mask)
    out = generate(ours, ids.numpy(), mask.numpy(), pixels.numpy(), max_new_tokens=MAX_NEW)
    assert out.dtype == np.int64
    assert out.tolist() == ref.tolist()
    assert_varied(out)


def test_eos_row_is_padded_like_transformers(hf_model_pair):
    """A row that emits eos is padded afterwards (transformers' behaviour), the other row goes on.

    With this seed, the second prompt of the `pg1` model emits eos as its first token."""
    hf, ours, cfg = hf_model_pair("pg1")
    ids, mask = make_prompts(cfg, [5, 2], side="left")
    pixels = random_pixels(cfg, 2)
    out = generate(ours, ids.numpy(), mask.numpy(), pixels.numpy(), max_new_tokens=MAX_NEW)
    ref = hf_greedy(hf, ids, pixels, mask)
    assert out.tolist() == ref.tolist()
    assert out[1, 0] == cfg.eos_token_id and (out[1, 1:] == cfg.pad_token_id).all()
    assert out.shape == (2, MAX_NEW) and cfg.eos_token_id not in out[0].tolist()
    # Both rows finished: generation stops early.
    one = generate(ours, ids[1:].numpy(), mask[1:].numpy(), pixels[1:].numpy(), max_new_tokens=MAX_NEW)
    assert one.tolist() == [[cfg.eos_token_id]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", BATCH_VARIANTS)
def test_batch_generates_what_each_prompt_generates_alone(hf_model_pair, variant, side):
    hf, ours, cfg = hf_model_pair(variant)
    lens = [7, 1, 4]
    ids, mask = make_prompts(cfg, lens, side=side, seed=11)
    pixels = random_pixels(cfg, len(lens), seed=12)
    batch = generate(ours, ids.numpy(), mask.numpy(), pixels.numpy(), max_new_tokens=MAX_NEW)
    assert_varied(batch)
    for i in range(len(lens)):
        row_ids = ids[i][mask[i].bool()][None]
        alone = generate(ours, row_ids.numpy(), np.ones(row_ids.shape, dtype=np.int64),
                         pixels[i:i + 1].numpy(), max_new_tokens=MAX_NEW)[0]
        # A row alone stops at its eos; in the batch it is padded after it.
        expected = np.full(batch.shape[1], cfg.pad_token_id)
        expected[: len(alone)] = alone
        assert batch[i].tolist() == expected.tolist(), f"row {i} ({side} padding)"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", ["pg1", "pg2", "pg2-kv1-win5", "pg2-mha-3l"])
def test_static_cache_decode_matches_full_forward(hf_model_pair, record_diff, variant, side):
    """Prefill + one-token decode steps through the static KV cache give the logits of a full
    forward over the same sequence (prompt as prefix, generated tokens as causal suffix)."""
    _, ours, cfg = hf_model_pair(variant)
    n = 12
    ids, mask = make_prompts(cfg, [6, 2], side=side, seed=21)
    pixels = random_pixels(cfg, 2, seed=22)
    B, S = ids.shape

    stepper = EagerStepper(ours)
    step_logits = [stepper.prefill(ids.numpy(), mask.numpy(), pixels.numpy(), max_new_tokens=n)]
    fed = []
    for _ in range(n - 1):
        tokens = step_logits[-1].argmax(-1)
        fed.append(tokens)
        step_logits.append(stepper.decode(tokens))
    fed = torch.from_numpy(np.stack(fed, 1))  # [B, n-1]

    full_ids = torch.cat([ids, fed], 1)
    full_mask = torch.cat([mask, torch.ones_like(fed)], 1)
    full_tt = torch.cat([torch.zeros_like(ids), torch.ones_like(fed)], 1)
    with torch.no_grad():
        full = ours(full_ids, pixels, full_mask, full_tt)
    last_real = S - 1 - torch.flip(mask, [1]).argmax(-1)  # [B]
    expected = [full[torch.arange(B), last_real]] + [full[:, S + i] for i in range(n - 1)]
    d = max((torch.from_numpy(got) - want).abs().max().item() for got, want in zip(step_logits, expected))
    record_diff("decode vs full forward", d)
    assert d <= LOGIT_ATOL
    assert_varied(fed.numpy())


# ----------------------------------------------------------------------------- mask rule
def _brute_force_mask(q_slots, kv_valid, kv_prefix, q_prefix, window):
    B, T = kv_valid.shape
    S = len(q_slots)
    out = torch.zeros(B, 1, S, T, dtype=torch.bool)
    for b, s, t in itertools.product(range(B), range(S), range(T)):
        q = int(q_slots[s])
        between = int(kv_valid[b, t + 1:q + 1].sum())  # real tokens after the key, up to the query
        causal = t <= q and (window is None or between < window)
        both_prefix = bool(q_prefix[b, s]) and bool(kv_prefix[b, t])
        # A query always sees its own slot (a padding query would otherwise see nothing).
        out[b, 0, s, t] = ((causal or both_prefix) and bool(kv_valid[b, t])) or t == q
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_prefix_lm_mask_matches_brute_force(window):
    rng = random.Random(window or 0)
    for trial in range(20):
        B, T = rng.randint(1, 3), rng.randint(1, 10)
        S = rng.randint(1, T)
        if trial % 2:  # prefill: queries are the first S slots
            q_slots = torch.arange(S)
        else:  # any slots (decode writes one query at a later slot)
            q_slots = torch.tensor(sorted(rng.sample(range(T), S)))
        rand = lambda *shape: torch.tensor([rng.random() < 0.6 for _ in range(np.prod(shape))]).view(*shape)  # noqa: E731
        kv_valid, kv_prefix, q_prefix = rand(B, T), rand(B, T), rand(B, S)
        got = prefix_lm_mask(q_slots, kv_valid, kv_prefix, q_prefix, window)
        assert got.dtype == torch.bool and got.shape == (B, 1, S, T)
        want = _brute_force_mask(q_slots, kv_valid, kv_prefix, q_prefix, window)
        assert torch.equal(got, want), (trial, q_slots, kv_valid, kv_prefix, q_prefix)


def test_prefix_lm_mask_prefill_layout():
    """A left-padded row: padding is invisible, image + prompt bidirectional, suffix causal."""
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1]]).bool()
    prefix = torch.tensor([[0, 0, 1, 1, 1, 0, 0]]).bool()
    m = prefix_lm_mask(torch.arange(7), valid, prefix, prefix)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0],  # padding queries see only themselves
        [0, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],  # prefix sees all of the prefix, not the suffix
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],  # suffix: causal
        [0, 0, 1, 1, 1, 1, 1],
    ]
    w = prefix_lm_mask(torch.arange(7), valid, prefix, prefix, window=2)[0, 0].int().tolist()
    assert w[6] == [0, 0, 0, 0, 0, 1, 1]  # a causal query sees only `window` tokens back
    # The window counts real tokens: a row with padding inside (right-padded prompt, then a
    # generated token) sees as far back as the same row without it.
    gap = torch.tensor([[1, 1, 1, 0, 0, 1]]).bool()
    assert prefix_lm_mask(torch.tensor([5]), gap, gap & False, torch.tensor([[False]]), window=3)[0, 0].int().tolist() \
        == [[0, 1, 1, 0, 0, 1]]
    assert w[2] == [0, 0, 1, 1, 1, 0, 0]  # the bidirectional prefix ignores the window


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_training_attention_matches_sdpa(kv_heads, masked, dtype, monkeypatch, record_diff):
    """With gradients on the CPU, attention() takes its explicit path (PyTorch's CPU flash
    backward is slow) and gives SDPA's outputs and gradients: grouped KV heads, masks, a scale."""
    import pgexport.models.attention as att

    g = torch.Generator().manual_seed(kv_heads + 10 * masked)
    B, H, S, Dh, scale = 3, 4, 9, 16, 0.3
    q = torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, S, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if masked:
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :3] = False  # a left-padded row
        prefix = torch.zeros(B, S, dtype=torch.bool)
        prefix[:, 3:6] = True
        mask = prefix_lm_mask(torch.arange(S), valid, prefix, prefix)
    out_grad = torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64)

    ref = [t.clone().requires_grad_() for t in (q, k, v)]  # the reference in fp64 through SDPA itself
    kr, vr = (t.repeat_interleave(H // kv_heads, dim=1) for t in ref[1:])  # query head h reads KV head h // groups
    want = torch.nn.functional.scaled_dot_product_attention(ref[0], kr, vr, attn_mask=mask, scale=scale)
    (want * out_grad).sum().backward()

    def no_sdpa(*args, **kwargs):
        raise AssertionError("CPU training took SDPA")

    monkeypatch.setattr(att.F, "scaled_dot_product_attention", no_sdpa)
    mine = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = att.attention(*mine, mask, scale)
    (got.double() * out_grad).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 0.05  # bf16 keeps 8 bits of mantissa
    record_diff(f"cpu training attention vs SDPA ({dtype})", (got.double() - want).abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol)


def test_long_cpu_training_sequences_keep_sdpa(monkeypatch):
    """Past EXPLICIT_MAX_SCORES the explicit path would store every head's [S, T] probabilities
    for the backward pass; SDPA is used instead. Inference (no gradients) always uses SDPA."""
    import pgexport.models.attention as att

    calls = []
    sdpa = att.F.scaled_dot_product_attention
    monkeypatch.setattr(att.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    monkeypatch.setattr(att, "EXPLICIT_MAX_SCORES", 8 * 8)
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))  # 9 x 9 scores > 64
    att.attention(q, k, v, None, None).sum().backward()
    assert calls == [1]
    with torch.no_grad():
        att.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], None, None)  # 64 scores, but no gradients
    assert calls == [1, 1]
    att.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], None, None)  # 64 scores with gradients: explicit
    assert calls == [1, 1]


# ----------------------------------------------------------------------------- vision tower
@pytest.mark.parametrize("variant", ["pg1", "pg1-img84", "pg2-img112"])
def test_image_features_match_transformers(hf_model_pair, record_diff, variant):
    hf, ours, cfg = hf_model_pair(variant)
    pixels = random_pixels(cfg, 2, seed=31)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_tower = hf.model.vision_tower(pixel_values=pixels).last_hidden_state
        out = ours.encode_image(pixels)
        out_tower = ours.vision_tower(pixels)
    assert out.shape == ref.shape == (2, cfg.num_image_tokens, cfg.text.hidden_size)
    assert out_tower.shape == ref_tower.shape == (2, cfg.num_image_tokens, cfg.vision.hidden_size)
    d = (out - ref).abs().max().item()
    record_diff("image features", d)
    assert d <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (out_tower - ref_tower).abs().max().item() <= 1e-4 * max(1.0, ref_tower.abs().max().item())
    # Different images give different features (the tower is not degenerate).
    assert (out[0] - out[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_and_top_k_1_is_greedy(hf_model_pair):
    _, ours, cfg = hf_model_pair("pg2")
    ids, mask = make_prompts(cfg, [5, 2], side="left")
    pixels = random_pixels(cfg, 2)
    args = (ours, ids.numpy(), mask.numpy(), pixels.numpy())

    greedy = generate(*args, max_new_tokens=MAX_NEW)
    assert generate(*args, max_new_tokens=MAX_NEW, sampling=Sampling()).tolist() == greedy.tolist()
    top1 = generate(*args, max_new_tokens=MAX_NEW, sampling=Sampling(do_sample=True, top_k=1, temperature=2.0, seed=3))
    assert top1.tolist() == greedy.tolist()

    s = dict(do_sample=True, temperature=1.5, top_p=0.95)
    a = generate(*args, max_new_tokens=MAX_NEW, sampling=Sampling(**s, seed=1234))
    b = generate(*args, max_new_tokens=MAX_NEW, sampling=Sampling(**s, seed=1234))
    c = generate(*args, max_new_tokens=MAX_NEW, sampling=Sampling(**s, seed=4321))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a.tolist() != greedy.tolist()
    assert ((0 <= a) & (a < cfg.text.vocab_size)).all()
