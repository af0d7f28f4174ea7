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
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pgexport.errors import PgExportError

from .config import PaliGemmaConfig
from .paligemma import PaliGemma

_EMBED = "language_model.embed_tokens.weight"
_TIED_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


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


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PaliGemma:
    """Build a `PaliGemma` from a Hugging Face folder, with every weight accounted for.

    >>> model = load_checkpoint("paligemma-3b-pt-224", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    cfg = read_config(folder)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}  # explicit copies of the tied head, checked below
    problems: list[str] = []
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = to_internal_name(key)
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in _TIED_HEAD_KEYS:  # Gemma ties the head to the embedding table
                        if shape != expected[_EMBED]:
                            problems.append(f"{key}: checkpoint {list(shape)} vs embedding {list(expected[_EMBED])}")
                        else:
                            heads[key] = f.get_tensor(key)
                    elif name not in expected:
                        problems.append(f"unexpected tensor {key} {list(shape)}")
                    elif shape != expected[name]:
                        problems.append(f"{key}: checkpoint {list(shape)} vs config {list(expected[name])}")
                    elif name in state:
                        problems.append(f"{key} appears twice")
                    else:
                        # One copy: mmap -> (cast) -> target device.
                        state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise PgExportError(f"{path} cannot be read as safetensors ({_one_line(e)}); the file is corrupt or truncated, re-download it") from None
    missing = [f"missing tensor for {k} {list(s)}" for k, s in expected.items() if k not in state]
    problems += missing
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PgExportError(f"{Path(folder)} does not match its config.json: {'; '.join(problems[:3])}{more}")
    for key, head in heads.items():
        if not torch.equal(head.to(dtype), state[_EMBED].to("cpu")):
            raise PgExportError(f"{key} differs from the embedding table; PaliGemma ties its head to the embeddings and pgexport does not support an untied head")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_checkpoint(model: PaliGemma, folder: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and safetensors weights in the published naming (sharded if asked).

    Files go to a temporary name first and are renamed once complete.
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
        _atomic(folder / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            _atomic(folder / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _atomic(folder / "model.safetensors.index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    _atomic(folder / "config.json", lambda p: model.cfg.to_json_file(p))


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]
