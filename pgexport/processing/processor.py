"""PaliGemma processor: images + prompts -> model inputs, token ids -> text. No torch needed.

The sequence is `<image>` * num_image_tokens, `<bos>`, the prompt, "\\n" (the prefix, which
the model attends to in both directions), then for training `suffix<eos>` (the causal part):

    >>> proc = PaliGemmaProcessor.from_pretrained("paligemma-3b-pt-224")  # doctest: +SKIP
    >>> batch = proc(images="cat.jpg", prompts="caption en")  # doctest: +SKIP
    >>> batch["input_ids"].shape, batch["pixel_values"].shape  # doctest: +SKIP
    ((1, 260), (1, 3, 224, 224))

Ids equal those of `transformers.PaliGemmaProcessor` on the same tokenizer. That processor
tokenizes `"<image>"*N + "<bos>" + prompt + "\\n"` as the text and `suffix + "<eos>"` as the
text pair, with bos/eos adding switched off; added tokens (`<image>`, `<bos>`, `<eos>`) cut the
text into chunks tokenized separately, so encoding `prompt + "\\n"` and `suffix` on their own
gives the same ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pgexport.errors import PgExportError
from pgexport.processing.image import preprocess_images, read_image_settings, write_preprocessor_config
from pgexport.processing.tokenizer import IMAGE_TOKEN, build_paligemma_tokenizer, load_tokenizer, save_tokenizer
from pgexport.vocab import base_vocab_size


class PaliGemmaProcessor:
    """Tokenizer + image preprocessing for PaliGemma; see the module docstring."""

    def __init__(self, tokenizer, image_size: int, num_image_tokens: int,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample: int = 3):
        self.tokenizer = tokenizer
        self.image_size, self.num_image_tokens = image_size, num_image_tokens
        self.mean, self.std, self.resample = mean, std, resample
        ids = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", IMAGE_TOKEN)}
        if None in ids.values():
            missing = [t for t, i in ids.items() if i is None]
            raise PgExportError(f"the tokenizer has no {' '.join(missing)} token; use the tokenizer of a "
                                "PaliGemma checkpoint (not a plain Gemma one)")
        self.pad_id, self.bos_id, self.eos_id, self.image_token_id = ids.values()

    @classmethod
    def from_pretrained(cls, folder: str | Path, num_image_tokens: int | None = None,
                        image_size: int | None = None) -> PaliGemmaProcessor:
        """Read the tokenizer and image settings of a checkpoint folder."""
        folder = Path(folder)
        settings = read_image_settings(folder)
        # The checkpoint config knows the vision geometry when the preprocessor config is absent
        # or predates `image_seq_length`. SigLIP defaults: 224 px, 14 px patches.
        vision = {}
        if (folder / "config.json").is_file():
            try:
                vision = json.loads((folder / "config.json").read_text()).get("vision_config", {})
            except (OSError, ValueError) as e:
                raise PgExportError(f"cannot read {folder / 'config.json'}: {e}; fix the file") from None
        image_size = image_size or settings["image_size"] or vision.get("image_size")
        if image_size is None:
            raise PgExportError(f"cannot tell the image size of {folder}: none of preprocessor_config.json, "
                                "processor_config.json, config.json gives it; pass image_size=")
        num_image_tokens = (num_image_tokens or settings["num_image_tokens"] or vision.get("num_image_tokens")
                            or (image_size // vision.get("patch_size", 14)) ** 2)
        return cls(load_tokenizer(folder), image_size, num_image_tokens,
                   settings["mean"], settings["std"], settings["resample"])

    @classmethod
    def stand_in(cls, image_token_id: int, image_size: int, num_image_tokens: int) -> PaliGemmaProcessor:
        """The processor of the presets: the small stand-in tokenizer, laid out for a vocabulary
        whose `<image>` id is `image_token_id` (see `pgexport.vocab`)."""
        return cls(build_paligemma_tokenizer(base_vocab_size(image_token_id)), image_size, num_image_tokens)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the tokenizer files and `preprocessor_config.json` (Hugging Face layout)."""
        save_tokenizer(self.tokenizer, folder)
        write_preprocessor_config(folder, self.image_size, self.num_image_tokens, self.mean, self.std, self.resample)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, images, prompts, suffixes=None, padding_side: str = "left",
                 max_length: int | None = None, return_tensors: str = "np") -> dict:
        """Build a batch: one image per prompt, or one image shared by all prompts.

        Returns `input_ids`, `attention_mask`, `token_type_ids` (int64 [B, S]), `pixel_values`
        (float32 [B, 3, H, W]) and, with suffixes, `labels` (suffix ids, -100 elsewhere).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        suffixes = [suffixes] if isinstance(suffixes, str) else suffixes
        if suffixes is not None and len(suffixes) != len(prompts):
            raise PgExportError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts; pass one per prompt")
        if padding_side not in ("left", "right"):
            raise PgExportError(f"padding_side={padding_side!r}; use 'left' or 'right'")
        if return_tensors not in ("np", "pt"):
            raise PgExportError(f"return_tensors={return_tensors!r}; use 'np' or 'pt'")

        pixel_values = preprocess_images(images, self.image_size, self.mean, self.std, self.resample)
        if len(pixel_values) == 1 < len(prompts):
            pixel_values = np.repeat(pixel_values, len(prompts), axis=0)  # one image for all prompts
        if len(pixel_values) != len(prompts):
            raise PgExportError(f"got {len(pixel_values)} images for {len(prompts)} prompts; "
                                "pass one image per prompt or a single image for all")

        sequences = []  # (ids, token types) per sample
        for i, prompt in enumerate(prompts):
            if IMAGE_TOKEN in prompt:
                raise PgExportError(f"prompt {i} contains {IMAGE_TOKEN}; pass the text only, "
                                    "the processor adds the image tokens")
            prefix = [self.image_token_id] * self.num_image_tokens + [self.bos_id] + self._encode(prompt + "\n")
            suffix = self._encode(suffixes[i]) + [self.eos_id] if suffixes is not None else []
            if max_length is not None and len(prefix) + len(suffix) > max_length:
                raise PgExportError(f"prompt {i} is {len(prefix) + len(suffix)} tokens ({self.num_image_tokens} "
                                    f"image tokens + text), over the limit of max_length={max_length}; shorten "
                                    "the prompt (when generating, the limit is the context minus the new tokens)")
            sequences.append((prefix + suffix, [0] * len(prefix) + [1] * len(suffix)))

        length = max(len(ids) for ids, _ in sequences)
        input_ids = np.full((len(prompts), length), self.pad_id, np.int64)  # [B, S]
        attention_mask = np.zeros((len(prompts), length), np.int64)  # [B, S], 0 on padding
        token_type_ids = np.zeros((len(prompts), length), np.int64)  # [B, S], 1 on the suffix
        for row, (ids, types) in enumerate(sequences):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span], attention_mask[row, span], token_type_ids[row, span] = ids, 1, types
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids, "pixel_values": pixel_values}
        if suffixes is not None:
            batch["labels"] = np.where(token_type_ids == 1, input_ids, -100)  # loss on the suffix only

        if return_tensors == "pt":
            # This module never imports torch (the ONNX Runtime path has none); a caller asking for
            # torch tensors has imported it already.
            torch = sys.modules.get("torch")
            if torch is None:
                raise PgExportError("return_tensors='pt' needs PyTorch: import torch first, or use 'np'")
            return {k: torch.from_numpy(v) for k, v in batch.items()}
        return batch

    def generation_batch(self, images, prompts, max_new_tokens: int, context: int | None,
                         padding_side: str = "left") -> dict:
        """The batch to generate `max_new_tokens` from, checked against the model's `context`
        (prompt + new tokens must fit; None: no limit known)."""
        if context is not None and max_new_tokens >= context:
            raise PgExportError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} "
                                "tokens (prompt included); ask for fewer new tokens")
        return self(images=images, prompts=prompts, padding_side=padding_side,
                    max_length=None if context is None else context - max_new_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids (list, NumPy or torch, 1-D) -> text; loc/seg tokens are kept as text."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                     skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        """[B, S] ids -> B strings."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def load_processor(path: str | Path) -> PaliGemmaProcessor:
    """Load the processor of a checkpoint folder (see `PaliGemmaProcessor.from_pretrained`)."""
    return PaliGemmaProcessor.from_pretrained(path)
