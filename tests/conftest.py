"""Shared builders for the model tests: random tiny PaliGemma checkpoints written by transformers.

`transformers` is the numerical reference. The helpers below build a
`transformers.PaliGemmaForConditionalGeneration` from one of our configs, fill it with seeded
random weights that are large enough for greedy decoding to wander over the vocabulary (all-zero
RMSNorm weights or tiny matrices would hide bugs and make every generated token the same), save
it with `save_pretrained` and load it back with our `load_checkpoint`.

Use the fixtures in tests (`checkpoints`, `hf_model_pair`); later test files (ONNX export,
quantization) can also import the plain functions: `from conftest import build_hf_model, ...`.

    def test_something(checkpoints):
        ck = checkpoints("pg2")                 # cached for the whole session
        ck.cfg, ck.hf, ck.folder                # our config, the reference model, the HF folder
        ours = ck.load()                        # a fresh pgexport model from the folder
        ids, mask = make_prompts(ck.cfg, [5, 2])  # two prompts, left padded
        pixels = random_pixels(ck.cfg, 2)
"""

from __future__ import annotations

import fcntl
import os

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from pgexport.api import export
from pgexport.models import PaliGemmaConfig
from pgexport.models.checkpoint import load_checkpoint

from js_packages import install_npm_packages

NEWLINE_ID = 108  # Gemma's "\n", ends every PaliGemma prompt

# ----------------------------------------------------------------------------- configs
# Small variants covering every code path that differs between checkpoints. All derive from the
# tiny presets (vision 48 wide / 2 layers, decoder 64 wide / 2 layers, vocab 1728, 56 px images
# = 16 image tokens). Several factors are combined per variant to keep the suite fast.
VARIANTS: dict[str, Callable[[], PaliGemmaConfig]] = {
    # Gemma 1, one KV head (multi-query), 56 px.
    "pg1": lambda: PaliGemmaConfig.from_preset("paligemma-tiny"),
    # Gemma 1 with grouped-query attention.
    "pg1-kv2": lambda: PaliGemmaConfig.from_preset("paligemma-tiny").replace(text=dict(num_key_value_heads=2)),
    # Gemma 1 at 84 px (36 image tokens).
    "pg1-img84": lambda: PaliGemmaConfig.from_preset("paligemma-tiny").replace(vision=dict(image_size=84)),
    # Gemma 2: 2 KV heads, query_pre_attn_scalar 24 != head_dim 16, sliding window 16 on layer 0
    # (shorter than the 16 image tokens + prompt + generated tokens), soft-caps 50 / 30.
    "pg2": lambda: PaliGemmaConfig.from_preset("paligemma2-tiny"),
    # Gemma 2, multi-query, a window of 5 slots, head_dim 8 != hidden / heads (as in Gemma 2 2B).
    "pg2-kv1-win5": lambda: PaliGemmaConfig.from_preset("paligemma2-tiny").replace(
        text=dict(num_key_value_heads=1, sliding_window=5, head_dim=8)
    ),
    # Gemma 2, one KV head per query head, three layers (sliding, full, sliding).
    "pg2-mha-3l": lambda: PaliGemmaConfig.from_preset("paligemma2-tiny").replace(
        text=dict(num_key_value_heads=4, num_hidden_layers=3,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    ),
    # Gemma 2 at 112 px (64 image tokens, four times the window).
    "pg2-img112": lambda: PaliGemmaConfig.from_preset("paligemma2-tiny").replace(vision=dict(image_size=112)),
    # Gemma 2 without any effective sliding window (window longer than any test sequence): a
    # padded batch then generates exactly what each prompt generates alone.
    "pg2-nowin": lambda: PaliGemmaConfig.from_preset("paligemma2-tiny").replace(text=dict(sliding_window=4096)),
}


def variant_config(name: str) -> PaliGemmaConfig:
    return VARIANTS[name]()


# ----------------------------------------------------------------------------- reference model
def hf_config(cfg: PaliGemmaConfig, attn_implementation: str = "eager"):
    """transformers config for our config. Eager attention: the only transformers path that
    implements Gemma 2's attention soft-cap (SDPA refuses it), so it is the reference."""
    import transformers

    hcfg = transformers.PaliGemmaConfig(**cfg.to_hf_dict())
    hcfg._attn_implementation = attn_implementation
    return hcfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded random values, in place.

    Scales were chosen by looking at greedy outputs of the tiny variants: 20 tokens spread over
    the vocabulary rather than one token repeated. The token embedding is small (it is tied to
    the head and scaled by sqrt(hidden) on input: a large one makes the model echo its input
    token), matrices are large, and RMSNorm weights are far from their zero init so that a
    missing `1 + weight` or a norm applied at the wrong place shows up in the logits.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "embed_tokens" in name:
            std, mean = 0.05, 0.0
        elif p.ndim >= 2:  # linear / conv weights, position embeddings
            std, mean = 0.3, 0.0
        elif name.endswith("norm.weight") or "layernorm.weight" in name:
            # RMSNorm (Gemma) multiplies by (1 + w); LayerNorm (SigLIP) by w.
            is_rms = "language_model" in name
            std, mean = (1.0, 0.0) if is_rms else (0.2, 1.0)
        else:  # biases
            std, mean = 0.1, 0.0
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).add_(mean).to(p.dtype))
    return model


def loud_weights_(model, seed: int, norm_std: float, post_norm_shift: float = 0.0):
    """On top of `PaliGemma.random`: a small random embedding and random Gemma norm weights (the
    post-norms of Gemma 2 shifted by `post_norm_shift`), so that greedy decoding of a random model
    varies instead of repeating one token. Seeded by `seed + 1`; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0.0, 0.05, generator=g)
            elif "norm" in name and "language_model" in name:
                p.normal_(0.0, norm_std, generator=g)
                if post_norm_shift and "post_" in name:
                    p += post_norm_shift
    return model.eval()


def build_hf_model(cfg: PaliGemmaConfig, seed: int = 0):
    """A random `transformers.PaliGemmaForConditionalGeneration` (fp32, eval, eager attention)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.PaliGemmaForConditionalGeneration(hf_config(cfg))
    randomize_(hf, seed)
    hf.tie_weights()  # lm_head shares the embedding table (it already does; be explicit)
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    return hf.eval()


def save_hf_checkpoint(hf, folder: str | Path, **save_pretrained_kwargs) -> Path:
    """`save_pretrained` (transformers 5.x naming) into `folder`."""
    folder = Path(folder)
    hf.save_pretrained(folder, **save_pretrained_kwargs)
    assert (folder / "config.json").is_file()
    return folder


def load_hf_model(folder: str | Path):
    """transformers' own loader, eager attention, fp32."""
    import transformers

    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


# ----------------------------------------------------------------------------- inputs
def prompt_ids(cfg: PaliGemmaConfig, text_len: int, generator: torch.Generator) -> list[int]:
    """`<image>` * N + `<bos>` + `text_len` random ordinary tokens + newline, as the processor writes."""
    text = torch.randint(3, 500, (text_len,), generator=generator).tolist()
    return [cfg.image_token_id] * cfg.num_image_tokens + [cfg.bos_token_id] + text + [NEWLINE_ID]


def pad_batch(rows: list[list[int]], pad_id: int = 0, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) `[B, S]` int64, padded on `side`."""
    S = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        pad = S - len(r)
        if side == "left":
            ids.append([pad_id] * pad + r)
            mask.append([0] * pad + [1] * len(r))
        elif side == "right":
            ids.append(r + [pad_id] * pad)
            mask.append([1] * len(r) + [0] * pad)
        else:
            raise ValueError(side)
    return torch.tensor(ids), torch.tensor(mask)


def make_prompts(cfg: PaliGemmaConfig, text_lens: list[int], side: str = "left", seed: int = 1):
    """A padded batch of prompts with `text_lens[i]` text tokens each: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    return pad_batch([prompt_ids(cfg, n, g) for n in text_lens], cfg.pad_token_id, side)


def random_pixels(cfg: PaliGemmaConfig, batch: int, seed: int = 2) -> torch.Tensor:
    """Pixel values `[B, 3, H, W]` in [-1, 1], as the processor produces."""
    g = torch.Generator().manual_seed(seed)
    side = cfg.vision.image_size
    return torch.rand(batch, cfg.vision.num_channels, side, side, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- comparisons
def assert_same_parameters(ours: torch.nn.Module, hf) -> None:
    """Every parameter of our model is bitwise equal to the transformers parameter it maps to,
    and every transformers parameter (bar the tied head) has a counterpart."""
    from pgexport.models.checkpoint import to_internal_name

    ours_sd = ours.state_dict()
    hf_sd = {to_internal_name(k): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(ours_sd) == set(hf_sd), (set(ours_sd) ^ set(hf_sd))
    for k, v in ours_sd.items():
        ref = hf_sd[k]
        assert v.dtype == ref.dtype and v.shape == ref.shape, (k, v.dtype, ref.dtype, v.shape, ref.shape)
        assert torch.equal(v, ref), f"{k} differs (max {(v.float() - ref.float()).abs().max().item()})"


def copy_config(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() != dst.resolve():
        shutil.copy(Path(src) / "config.json", dst / "config.json")
    return dst


def edit_config(folder: str | Path, edit: Callable[[dict], None]) -> None:
    path = Path(folder) / "config.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=2))


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Checkpoint:
    name: str
    cfg: PaliGemmaConfig
    hf: object  # transformers.PaliGemmaForConditionalGeneration (do not modify)
    folder: Path  # written by hf.save_pretrained (do not modify; copy it first)

    def load(self, **kwargs):
        """A fresh pgexport model loaded from the folder by `load_checkpoint`."""
        return load_checkpoint(self.folder, **kwargs)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Callable[..., Checkpoint]:
    """Factory: `checkpoints(variant_name, seed=0)` -> a cached `Checkpoint`."""
    cache: dict[tuple[str, int], Checkpoint] = {}

    def get(name: str, seed: int = 0) -> Checkpoint:
        key = (name, seed)
        if key not in cache:
            cfg = variant_config(name)
            hf = build_hf_model(cfg, seed)
            folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp(f"hf-{name}-{seed}"))
            cache[key] = Checkpoint(name, cfg, hf, folder)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model_pair(checkpoints):
    """Factory: `hf_model_pair(variant_name)` -> (transformers model, our model, config), cached."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            ck = checkpoints(name)
            cache[name] = (ck.hf, ck.load(), ck.cfg)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory) -> Path:
    """The built-in demo model exported (fp32, not validated) once per test run; pytest-xdist
    workers share it: the first to take the lock exports, the others wait and reuse it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's folder
    out = shared / "demo-export"
    with open(shared / "demo-export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "pgexport.json").is_file():
            export(None, out, validate=False)
    return out


@pytest.fixture(scope="session")
def npm_packages() -> Callable[[Path], bool]:
    """Factory: `npm_packages(folder)` installs folder's npm packages from its package-lock.json on
    first use (once per checkout, shared by the pytest-xdist workers; see js_packages.py). The
    test skips where node / npm are missing or the npm registry is unreachable."""
    return install_npm_packages


@pytest.fixture(autouse=True, scope="session")
def _run_cache(tmp_path_factory):
    """pgexport's caches (traced graphs, `pgexport bench` variants, `pgexport batch` exports) in a
    folder of this test run, shared by the pytest-xdist workers and the processes tests start,
    instead of the user's `~/.cache/pgexport`: one trace per geometry for the whole run."""
    if "PGEXPORT_CACHE" in os.environ:
        yield
        return
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["PGEXPORT_CACHE"] = str(shared / "pgexport-cache")
    yield
    del os.environ["PGEXPORT_CACHE"]


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The test machines are small and shared; tiny models gain nothing from many threads. Under
    pytest-xdist each worker takes one thread (the workers already share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(n, 2))
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- measured errors
_MEASURED: list[tuple[str, str, float]] = []


@pytest.fixture
def record_diff(request):
    """`record_diff("logits", value)`: keep a measured error; all of them are listed at the end
    of the run (terminal summary), so tolerances can be judged against real numbers."""

    def record(what: str, value: float) -> None:
        _MEASURED.append((request.node.nodeid.split("::", 1)[-1], what, float(value)))

    return record


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured max abs differences")
        for test, what, value in _MEASURED:
            terminalreporter.write_line(f"{value:.3e}  {what:<28} {test}")
