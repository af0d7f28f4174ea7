"""Load and save Hugging Face PaliGemma checkpoints (safetensors only, never pickle).

Three key namings are in the wild and all map to this package's names by prefix:

    published (legacy)              vision_tower.vision_model.X   language_model.model.X
    transformers in memory          model.vision_tower.X          model.language_model.X
    transformers 5.x save_pretrained  vision_tower.X              language_model.model.X
    pgexport                        vision_tower.X                language_model.X

Loading is strict, like nanoGPT's `from_pretrained`: every tensor in the files must land on a
parameter of the same shape and every parameter must be set; anything else is reported by key
and shape. The model is built on the meta device, so the only full copy of the weights is the
one read from the memory-mapped files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pgexport.errors import PgExportError, one_line

from pgexport.models.config import PaliGemmaConfig
from pgexport.models.paligemma import PaliGemma

EMBED_KEY = "language_model.embed_tokens.weight"
TIED_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


def to_internal_name(key: str) -> str:
    """Any of the three Hugging Face namings -> this package's parameter name."""
    if key.startswith("model."):  # transformers' in-memory naming
        key = key[len("model."):]
    for old, new in (("vision_tower.vision_model.", "vision_tower."), ("language_model.model.", "language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_published_name(key: str) -> str:
    """This package's parameter name -> the published checkpoints' (legacy) naming."""
    for old, new in (("vision_tower.", "vision_tower.vision_model."), ("language_model.", "language_model.model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_config(folder: str | Path) -> PaliGemmaConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PgExportError(f"{path} not found; point --model at a Hugging Face PaliGemma folder or a preset name")
    try:
        return PaliGemmaConfig.from_json_file(path)
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        raise PgExportError(f"{path} is not a valid PaliGemma config: {e}") from None


def weight_files(folder: str | Path) -> list[Path]:
    """`model.safetensors`, or the shards named by `model.safetensors.index.json`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise PgExportError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from None
        files = [folder / n for n in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" ({', '.join(pickles)} are pickles, which pgexport never loads)" if pickles else ""
        raise PgExportError(f"no model.safetensors or model.safetensors.index.json in {folder}{hint}; save the checkpoint with safetensors")
    for f in files:
        if not f.is_file():
            raise PgExportError(f"{f} is listed in the index but missing; re-download the checkpoint")
    return files


def expected_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model `cfg` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = PaliGemma(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_weights(folder: str | Path, stored: dict[tuple[Path, str], tuple[int, ...]],
                  expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[Path, str]], list[tuple[Path, str]]]:
    """Match every stored tensor to a parameter, strictly; the one check every loader runs.

    `stored` maps (file, key as stored) -> shape. Returns parameter name -> (file, key), and the
    explicit copies of the tied LM head (to be compared with the embedding by the caller).
    Anything else (an unknown key, a shape that differs from the config, a key twice, a missing
    parameter) raises one error naming up to three problems by key and shape.
    """
    found: dict[str, tuple[Path, str]] = {}
    heads: list[tuple[Path, str]] = []
    problems: list[str] = []
    for (path, key), shape in stored.items():
        name = to_internal_name(key)
        if key in TIED_HEAD_KEYS:  # Gemma ties the head to the embedding table
            if tuple(shape) != tuple(expected[EMBED_KEY]):
                problems.append(f"{key}: checkpoint {list(shape)} vs embedding {list(expected[EMBED_KEY])}")
            else:
                heads.append((path, key))
        elif name not in expected:
            problems.append(f"unexpected tensor {key} {list(shape)}")
        elif tuple(shape) != tuple(expected[name]):
            problems.append(f"{key}: checkpoint {list(shape)} vs config {list(expected[name])}")
        elif name in found:
            problems.append(f"{key} appears twice")
        else:
            found[name] = (path, key)
    problems += [f"missing tensor for {k} {list(s)}" for k, s in expected.items() if k not in found]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PgExportError(f"{Path(folder)} does not match its config.json: {'; '.join(problems[:3])}{more}")
    return found, heads


def untied_head_error(key: str) -> PgExportError:
    return PgExportError(f"{key} differs from the embedding table; PaliGemma ties its head to the embeddings and "
                         "pgexport does not support an untied head")


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PaliGemma:
    """Build a `PaliGemma` from a Hugging Face folder, with every weight accounted for.

    >>> model = load_checkpoint("paligemma-3b-pt-224", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    cfg = read_config(folder)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = expected_shapes(cfg)
    files = weight_files(folder)
    stored: dict[tuple[Path, str], tuple[int, ...]] = {}
    for path in files:
        with _open_safetensors(path) as f:
            for key in f.keys():
                stored[(path, key)] = tuple(f.get_slice(key).get_shape())
    found, heads = match_weights(folder, stored, expected)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in found.items():
        by_file.setdefault(path, []).append((name, key))
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            for name, key in names:  # one copy: mmap -> (cast) -> target device
                state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
    for path, key in heads:
        with _open_safetensors(path) as f:
            if not torch.equal(f.get_tensor(key).to(dtype), state[EMBED_KEY].to("cpu")):
                raise untied_head_error(key)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _open_safetensors:
    """`safe_open` whose read errors become one-line `PgExportError`s naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self.handle.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise unreadable_safetensors(self.path, e) from None

    def __exit__(self, kind, value, tb):
        self.handle.__exit__(kind, value, tb)
        if isinstance(value, (SafetensorError, OSError, ValueError)):
            raise unreadable_safetensors(self.path, value) from None
        return False


def unreadable_safetensors(path: Path, error: BaseException) -> PgExportError:
    return PgExportError(f"{path} cannot be read as safetensors ({one_line(error)}); the file is corrupt or "
                         "truncated, re-download it")


def save_checkpoint(model: PaliGemma, folder: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and safetensors weights in the published naming (sharded if asked).

    Write into a staging folder (`pgexport.files.staging_folder`) and move it into place when the
    whole checkpoint is written: a single file renamed early would still leave a partial folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {to_published_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, folder / name, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.cfg.to_json_file(folder / "config.json")
