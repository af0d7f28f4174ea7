"""PaliGemma tokenizer: build a small stand-in, load a real one, save it for `transformers`.

PaliGemma uses Gemma's SentencePiece-style BPE (spaces become "▁", unknown characters fall back
to their UTF-8 bytes) plus 1024 `<locNNNN>` detection tokens, 128 `<segNNN>` segmentation
tokens and one `<image>` placeholder appended after the 256000 Gemma tokens.

`build_paligemma_tokenizer` makes a tokenizer with exactly that structure and id layout but a
tiny English vocabulary, so tests and tiny model presets need no downloaded files:

    >>> tok = build_paligemma_tokenizer(512)
    >>> tok.token_to_id("<loc0000>"), tok.token_to_id("<image>")
    (512, 1664)
    >>> tok.decode(tok.encode("caption en\\n", add_special_tokens=False).ids)
    'caption en\\n'

Ids of the built tokenizer: 0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`, 4..259 the byte tokens
`<0x00>`..`<0xFF>`, then "▁" and the learned word pieces, then `<unusedN>` fillers up to
`base_vocab_size`, then the loc, seg and image tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path
from types import SimpleNamespace

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from pgexport.errors import PgExportError
from pgexport.vocab import NUM_LOC_TOKENS, NUM_SEG_TOKENS


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 as in Gemma
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback for any character
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(NUM_SEG_TOKENS)]
IMAGE_TOKEN = "<image>"

_COLOURS = "red orange yellow green blue purple pink brown black white grey gray".split()
_SHAPES = "circle square triangle star rectangle diamond heart cross".split()
_NUMBERS = "zero one two three four five six seven eight nine ten".split()
_POSITIONS = "left right top bottom center middle".split()


def _corpus() -> list[str]:
    """A small fixed English corpus in the style of PaliGemma prompts and answers."""
    lines = ["caption en\n", "describe en\n", "ocr\n", "answer en how many shapes are there?\n"]
    for i, colour in enumerate(_COLOURS):
        shape, pos, num = _SHAPES[i % len(_SHAPES)], _POSITIONS[i % len(_POSITIONS)], _NUMBERS[i % 11]
        lines += [
            f"caption en\na {colour} {shape} on the {pos} of the image.",
            f"answer en what colour is the {shape}?\n{colour}",
            f"answer en what color is the {shape} in the {pos}?\n{colour}",
            f"answer en how many {shape}s are there?\n{num}",
            f"there is a {colour} {shape} and there are {num} {shape}s in the {pos}.",
            f"detect {shape} ; {colour} {shape}\n",
            f"segment {colour} {shape}\n",
            f"describe en\n{num} {colour} {shape}s, {i} in the {pos} and {i * 7} at the top.",
        ]
    return lines


def _train_word_pieces(max_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces and merges on `_corpus()`; returns ("▁" first, pieces..., merges)."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    # Training-only pre-tokenizer: "▁" only ever starts a piece, and digits, punctuation and
    # "\n" stay single characters (as in Gemma). No learned merge can then span a word
    # boundary, so the final tokenizer needs no pre-tokenizer, exactly like Gemma's.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Split(Regex(r"[0-9\n;?.,!:'\"()-]"), "isolated"),
    ])
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n▁")
    trainer = trainers.BpeTrainer(vocab_size=max_pieces, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    trainer_tok.train_from_iterator(_corpus(), trainer)  # deterministic: fixed corpus, ties by id
    model = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return ["▁"] + [p for p in pieces if p != "▁"], merges


def build_paligemma_tokenizer(base_vocab_size: int = 256000) -> Tokenizer:
    """Build a deterministic Gemma-style tokenizer with PaliGemma's special-token layout.

    `base_vocab_size` is where `<loc0000>` goes: 256000 for the real layout (image id 257152),
    512 for tiny test models (image id 1664).
    """
    head = SPECIAL_TOKENS + BYTE_TOKENS
    pieces, merges = _train_word_pieces(base_vocab_size - len(head))
    if len(head) + len(pieces) > base_vocab_size:
        raise ValueError(f"base_vocab_size={base_vocab_size} is too small; use at least {len(head) + len(pieces)}")
    fillers = [f"<unused{i}>" for i in range(base_vocab_size - len(head) - len(pieces))]
    vocab = {tok: i for i, tok in enumerate(head + pieces + fillers + LOC_TOKENS + SEG_TOKENS + [IMAGE_TOKEN])}

    # Same pipeline as Gemma's tokenizer.json: no pre-tokenizer, byte fallback, no dummy prefix.
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Gemma's template prepends <bos>; pgexport always encodes with add_special_tokens=False and
    # transformers' PaliGemmaProcessor switches it off, but plain AutoTokenizer users expect it.
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos>:1 $B:1",
                                            special_tokens=[("<bos>", vocab["<bos>"])])
    # Added tokens are matched before BPE, so they are never split. loc/seg are *not* special,
    # as in the published tokenizer: decode(skip_special_tokens=True) must keep detection
    # boxes and masks in the text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS + SEG_TOKENS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return tok


class SentencePieceTokenizer:
    """`tokenizer.model` behind the subset of the `tokenizers.Tokenizer` API that pgexport uses.

    SentencePiece does not recognise control tokens (`<bos>`, `<eos>`) written in the text, nor
    `<image>` (which is not in the .model file); we split those out first, as
    `tokenizers` does with added tokens. loc/seg tokens missing from the model are appended in
    PaliGemma's order (loc, seg, image) after its last piece.

        >>> tok = SentencePieceTokenizer("paligemma/tokenizer.model")  # doctest: +SKIP
        >>> tok.encode("<image><bos>caption en\\n").ids[:2]  # doctest: +SKIP
        [257152, 2]
    """

    _TAG = re.compile(r"<[^<>\s]+>")  # candidate special tokens; checked against the table

    def __init__(self, model_file: str | Path):
        import sentencepiece  # lazy: only needed for checkpoints without tokenizer.json

        self.model_file = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        n = self.sp.get_piece_size()
        self._control = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        missing = [t for t in LOC_TOKENS + SEG_TOKENS + [IMAGE_TOKEN] if self.sp.piece_to_id(t) == self.sp.unk_id()]
        self._added = {t: n + i for i, t in enumerate(missing)}
        self._added_by_id = {i: t for t, i in self._added.items()}
        self._special_ids = set(self._control.values()) | {self._added.get(IMAGE_TOKEN, -1)}

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str:
        return self._added_by_id.get(i) or self.sp.id_to_piece(i)

    def get_vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self._added)

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        ids, pos = [self.sp.bos_id()] if add_special_tokens and self.sp.bos_id() >= 0 else [], 0
        for m in self._TAG.finditer(text):
            special = self._control.get(m.group(), self._added.get(m.group()))
            if special is not None:
                ids += self.sp.encode(text[pos:m.start()]) + [special]
                pos = m.end()
        return SimpleNamespace(ids=ids + self.sp.encode(text[pos:]))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], []  # decode runs of ordinary pieces with SentencePiece (byte fallback)
        for i in map(int, ids):
            if i in self._special_ids or i in self._added_by_id:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and i in self._special_ids):
                    out.append(self.id_to_token(i))
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def load_tokenizer(folder: str | Path) -> Tokenizer | SentencePieceTokenizer:
    """Load `tokenizer.json` (preferred) or `tokenizer.model` from a checkpoint folder.

        >>> tok = load_tokenizer("paligemma-3b-pt-224")  # doctest: +SKIP
    """
    folder = Path(folder)
    json_file, sp_file = folder / "tokenizer.json", folder / "tokenizer.model"
    try:
        if json_file.is_file():
            return Tokenizer.from_file(str(json_file))
        if sp_file.is_file():
            return SentencePieceTokenizer(sp_file)
    except Exception as e:  # a corrupt file: say which one, not a Rust/protobuf trace
        raise PgExportError(f"cannot read the tokenizer in {folder}: {e}; re-copy it from the original checkpoint") from None
    raise PgExportError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model; "
                        "copy it from the original PaliGemma checkpoint")


def save_tokenizer(tok: Tokenizer | SentencePieceTokenizer, folder: str | Path) -> None:
    """Write the tokenizer plus the configs `transformers.AutoTokenizer` needs to load it.

    The settings follow the published PaliGemma files: a `GemmaTokenizer` with Gemma's
    defaults (`add_bos_token` true); `transformers`' PaliGemmaProcessor switches bos/eos adding
    off and inserts `<bos>` itself.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, SentencePieceTokenizer):
        if tok.model_file.resolve() != (folder / "tokenizer.model").resolve():
            shutil.copyfile(tok.model_file, folder / "tokenizer.model")
    else:
        tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "additional_special_tokens": [IMAGE_TOKEN]}
    config = {
        **special,
        "add_bos_token": True,  # Gemma's default; the PaliGemma processor turns it off
        "add_eos_token": False,
        "mask_token": None,  # GemmaTokenizer would otherwise add a "<mask>" token after <image>
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 1_000_000_000,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
        "processor_class": "PaliGemmaProcessor",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
