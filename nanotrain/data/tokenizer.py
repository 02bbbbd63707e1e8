"""Tokenizers: one interface, two file formats, chosen by the file's content.

`Tokenizer.load(path)` reads a sentencepiece `.model` (`SentencePieceTokenizer`, e.g. Llama 2's
tokenizer.model) or a Hugging Face `tokenizer.json` (`HuggingFaceTokenizer`, e.g. GPT-2's
byte-level BPE or Llama 3's, read with the `tokenizers` library); both encode, decode, and name their special ids, their
sha256, and the bytes and file name under which datasets and checkpoints store them unchanged.
Loading never executes anything from the file: one is a protobuf, the other JSON.

`Tokenizer.train(texts, vocab_size)` trains a sentencepiece byte-pair encoding with byte fallback,
so any UTF-8 text encodes (characters never seen in training become their UTF-8 bytes,
`<0xF0>` ...), with fixed special-token ids, the same as Llama 2's tokenizer.model plus a padding
token:

    unk = 0, bos = 1, eos = 2, pad = 3

Llama 2's tokenizer.model (and other loaded tokenizers) may have no padding token. `pad_id` then
falls back to eos (or unk): padding positions are masked out by `attention_mask` and -100
labels, so which id fills them does not matter, only that it is a valid embedding row.

Training is deterministic: a single trainer thread and a fixed sampling seed, so the same
text and vocab size give a byte-identical model file (tests/test_tokenizer.py checks it).

A tokenizer.json's special ids come from the file itself: a TemplateProcessing post-processor
names BOS (a special token before the text) and EOS (one after it); otherwise the special added
tokens are looked up by the usual names (BOS_NAMES, EOS_NAMES, PAD_NAMES). GPT-2 has only
`<|endoftext|>`, which then serves as both BOS and EOS. nanotrain adds BOS and EOS itself, so text
is encoded without the post-processor, and text spelling a special token is encoded as text, as
sentencepiece treats "<s>": no document can forge a document boundary (docs/03).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from nanotrain.errors import TokenizerError, first_line

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
MAX_SENTENCE_BYTES = 8192  # longer training lines are cut into pieces of this size
TRAINING_SENTENCES = 2_000_000  # lines sampled for training: bounds memory on huge corpora


@dataclass(frozen=True)
class ModelSpec:
    """The parts of a sentencepiece model file that decide how text becomes pieces.

    `SentencePieceProcessor` exposes pieces, scores and ids but not these settings; they are read
    from the file's protobuf (see `SentencePieceTokenizer.spec`) so that an exported Hugging Face tokenizer can
    reproduce them exactly, or refuse.
    """

    pieces: tuple[tuple[str, float, str], ...]  # (piece, score, kind) in id order; kinds are PIECE_KINDS' values
    model_type: str  # "unigram", "bpe", "word" or "char"
    byte_fallback: bool  # characters outside the vocabulary become <0xXX> byte pieces, not <unk>
    add_dummy_prefix: bool  # encode "▁" + text, so a first word gets the same pieces as any other
    remove_extra_whitespaces: bool  # strip leading/trailing spaces and collapse runs before encoding
    escape_whitespaces: bool  # spaces become "▁"
    whitespace_as_suffix: bool  # "▁" ends a word instead of starting it
    normalization_rules: bool  # a character map (e.g. NFKC) is applied before encoding
    denormalization_rules: bool  # a character map is applied after decoding


PIECE_KINDS = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class Tokenizer:
    """Encode text to token ids and back. Build with `Tokenizer.train(...)` or `Tokenizer.load(path)`.

    Every implementation sets `file_bytes` (stored unchanged by datasets and checkpoints, under
    `file_name`), `sha256`, `vocab_size` and the special ids (-1 when absent) through `_set_ids`.
    """

    file_name: str  # the name datasets and checkpoints store `file_bytes` under

    def _set_ids(self, file_bytes: bytes, path: Path | None, vocab_size: int, bos: int, eos: int, unk: int,
                 pad: int) -> None:
        self.file_bytes, self.path = file_bytes, path
        self.sha256 = hashlib.sha256(file_bytes).hexdigest()
        self.vocab_size, self.bos_id, self.eos_id, self.unk_id = vocab_size, bos, eos, unk
        self.has_pad = pad >= 0
        self.pad_id = pad if self.has_pad else (eos if eos >= 0 else unk)
        if eos < 0:
            raise TokenizerError(
                f"tokenizer {path or '(in memory)'} has no end-of-sequence token; documents need one"
            )

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a sentencepiece `.model` or a Hugging Face `tokenizer.json` unchanged, whichever the file holds."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file '{path}' does not exist")
        file_bytes = path.read_bytes()
        if not file_bytes.strip():  # sentencepiece would take it for a model with no pieces, and log about it
            raise TokenizerError(f"tokenizer file '{path}' is empty, not a tokenizer; pass a sentencepiece .model "
                                 "or a Hugging Face tokenizer.json")
        if file_bytes.lstrip()[:1] in (b"{", b"["):  # JSON; a sentencepiece protobuf starts with field 1's tag, 0x0A
            return HuggingFaceTokenizer(file_bytes, path)
        try:
            return SentencePieceTokenizer(file_bytes, path)
        except RuntimeError as e:  # sentencepiece reports a bad protobuf as RuntimeError
            raise TokenizerError(f"'{path}' is neither a sentencepiece .model nor a Hugging Face tokenizer.json "
                                 f"({first_line(e)})") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        """Train a sentencepiece tokenizer (see `SentencePieceTokenizer.train`)."""
        return SentencePieceTokenizer.train(texts, vocab_size)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer's file; its bytes (and so its sha256) are unchanged."""
        path = Path(path)
        path.write_bytes(self.file_bytes)
        return path

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (None for -1)."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The ids of `text`, with BOS before and EOS after when asked."""
        raise NotImplementedError

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """`encode` of every text, on several threads."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens (BOS, EOS, padding) decode to nothing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, sha256={self.sha256[:12]})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`: trained here (`train`) or loaded unchanged (e.g. Llama 2's tokenizer.model)."""

    file_name = "tokenizer.model"

    def __init__(self, file_bytes: bytes, path: Path | None = None):
        self.processor = spm.SentencePieceProcessor(model_proto=file_bytes)
        self._set_ids(file_bytes, path, self.processor.vocab_size(), self.processor.bos_id(),
                      self.processor.eos_id(), self.processor.unk_id(), self.processor.pad_id())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        """Train a byte-fallback BPE model of `vocab_size` pieces on an iterable of documents.

        Documents are fed line by line (sentencepiece's unit is a line); lines longer than
        MAX_SENTENCE_BYTES are cut rather than silently dropped by the trainer.
        """
        if vocab_size < NUM_SPECIAL + 256 + 1:
            raise TokenizerError(
                f"vocab_size {vocab_size} is too small: byte fallback alone needs {NUM_SPECIAL + 256} "
                f"ids; use at least {NUM_SPECIAL + 256 + 1}"
            )
        model = io.BytesIO()
        spm.set_random_generator_seed(0)  # the line sampler's seed: same input, same model
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=0.9995,  # rare characters fall back to bytes
                split_digits=True,
                allow_whitespace_only_pieces=True,
                remove_extra_whitespaces=False,  # keep the text exactly as written
                normalization_rule_name="identity",
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=TRAINING_SENTENCES,
                shuffle_input_sentence=True,
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                num_threads=1,  # thread scheduling must not change the model bytes
                minloglevel=2,  # sentencepiece logs every step to stderr otherwise
            )
        except RuntimeError as e:
            raise TokenizerError(_explain_training_error(e, vocab_size)) from None
        return cls(model.getvalue())

    @functools.cached_property
    def spec(self) -> ModelSpec:
        """The model file's normalization and segmentation settings, read from its protobuf."""
        model = _message(self.file_bytes)
        # A sub-message that occurs more than once is merged, which is what parsing the concatenation does.
        trainer, normalizer, denormalizer = (_message(b"".join(model.get(n, []))) for n in (2, 3, 5))
        pieces = []
        for raw in model.get(1, []):
            piece = _message(raw)
            score = struct.unpack("<f", _last(piece, 2, b"\0\0\0\0"))[0]
            pieces.append((_last(piece, 1, b"").decode("utf-8"), score, _name(PIECE_KINDS, _last(piece, 3, 1))))
        return ModelSpec(
            pieces=tuple(pieces),
            model_type=_name(MODEL_TYPES, _last(trainer, 3, 1)),
            byte_fallback=bool(_last(trainer, 35, 0)),
            add_dummy_prefix=bool(_last(normalizer, 3, 1)),
            remove_extra_whitespaces=bool(_last(normalizer, 4, 1)),
            escape_whitespaces=bool(_last(normalizer, 5, 1)),
            whitespace_as_suffix=bool(_last(trainer, 24, 0)),
            normalization_rules=bool(_last(normalizer, 2, b"")),
            denormalization_rules=bool(_last(denormalizer, 2, b"")),
        )

    def token(self, token_id: int) -> str | None:
        return self.processor.id_to_piece(token_id) if token_id >= 0 else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many texts at once on `num_threads` C++ threads (-1: all cores)."""
        return self.processor.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])



def _training_lines(texts: Iterable[str]):
    for text in texts:
        for line in text.splitlines():
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                # MAX_SENTENCE_BYTES//4 characters are at most MAX_SENTENCE_BYTES bytes of UTF-8
                yield line[: MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4 :]
            if line.strip():
                yield line


def _message(data: bytes) -> dict[int, list]:
    """The fields of a serialized protobuf message: field number -> values in file order.

    Varints come back as int; fixed-width numbers, strings and sub-messages as bytes.
    A few lines instead of a dependency on the protobuf package, which nanotrain does not need otherwise.
    """
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type in (1, 2, 5):
            if wire_type == 2:
                size, pos = _varint(data, pos)
            else:
                size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise TokenizerError("the sentencepiece model file is truncated")
        else:
            raise TokenizerError(f"the sentencepiece model file has an unknown protobuf wire type {wire_type}")
        fields.setdefault(field, []).append(value)
    return fields


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise TokenizerError("the sentencepiece model file is truncated")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _name(names: dict[int, str], number: int) -> str:
    return names.get(number, f"type {number}")  # a value newer than this code: named, so it can be refused


def _last(fields: dict[int, list], number: int, default):
    """A singular field's value: protobuf lets a later occurrence override an earlier one."""
    return fields[number][-1] if number in fields else default


def _explain_training_error(error: RuntimeError, vocab_size: int) -> str:
    message = str(error)
    limit = re.search(r"value <= (\d+)", message)
    if "Vocabulary size is too high" in message or limit:
        most = f" (at most {limit.group(1)} for this text)" if limit else ""
        return f"--vocab_size {vocab_size} is too large for this data{most}; lower it or add more text"
    if "Vocabulary size is smaller than required_chars" in message:
        return f"--vocab_size {vocab_size} is smaller than the number of distinct characters; raise it"
    if "input_sentence" in message or "No valid" in message or "empty" in message.lower():
        return "no text to train the tokenizer on: the inputs hold no non-empty lines"
    return f"sentencepiece could not train a tokenizer: {first_line(error)}"


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, loaded unchanged."""

    file_name = "tokenizer.json"

    def __init__(self, file_bytes: bytes, path: Path | None = None):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError("a Hugging Face tokenizer.json needs the tokenizers package: "
                                 "pip install 'nanotrain[tokenizers]'") from None
        where = f"'{path}'" if path else "the tokenizer.json"
        try:
            text = file_bytes.decode("utf-8")
            description = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{where} is not valid JSON ({first_line(e)}); pass an intact Hugging Face "
                                 "tokenizer.json or a sentencepiece .model") from None
        if not isinstance(description, dict) or not isinstance(description.get("model"), dict):
            raise TokenizerError(f"{where} is JSON but not a Hugging Face tokenizer.json (it has no 'model' object)")
        try:
            self.backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception for any description it cannot build
            raise TokenizerError(f"{where} is not a tokenizer.json the tokenizers library can read "
                                 f"({first_line(e)})") from None
        self.backend.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not a boundary
        vocab = self.backend.get_vocab(with_added_tokens=True)
        special = {token["content"]: token["id"] for token in description.get("added_tokens") or []
                   if isinstance(token, dict) and token.get("special")}

        def named(names: tuple[str, ...]) -> int:
            return next((special[name] for name in names if name in special), -1)

        before, after = _template_ids(description.get("post_processor"))
        eos = after if after >= 0 else named(EOS_NAMES)
        if eos < 0:
            raise TokenizerError(f"{where} has no end-of-text token: its post-processor appends none and no special "
                                 f"added token is named {', '.join(EOS_NAMES)}; documents need one")
        bos = before if before >= 0 else named(BOS_NAMES)
        unk_token = description["model"].get("unk_token")
        self._set_ids(file_bytes, path, max(vocab.values()) + 1, bos if bos >= 0 else eos, eos,
                      vocab.get(unk_token, -1) if isinstance(unk_token, str) else -1, named(PAD_NAMES))

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id) if token_id >= 0 else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many texts at once: on one thread when `num_threads` is 1, else on the tokenizers
        library's own thread pool (all cores, or RAYON_NUM_THREADS; its size is fixed at first use)."""
        if num_threads == 1:
            encoded = [self.backend.encode(text, add_special_tokens=False).ids for text in texts]
        else:
            encoded = [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def _template_ids(post_processor) -> tuple[int, int]:
    """(id before the text, id after it) in a TemplateProcessing's single-text template, -1 where none."""
    if not isinstance(post_processor, dict):
        return -1, -1
    if post_processor.get("type") == "Sequence":
        found = [_template_ids(p) for p in post_processor.get("processors") or []]
        return (next((b for b, _ in found if b >= 0), -1), next((a for _, a in found if a >= 0), -1))
    if post_processor.get("type") != "TemplateProcessing":
        return -1, -1
    single, tokens = post_processor.get("single") or [], post_processor.get("special_tokens") or {}
    text_at = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
    if text_at is None:
        return -1, -1

    def first_id(names: list[str]) -> int:
        ids = (tokens.get(names[0]) or {}).get("ids") if names else None
        return ids[0] if ids else -1

    special = [piece["SpecialToken"]["id"] if "SpecialToken" in piece else None for piece in single]
    before = [name for name in special[:text_at] if name is not None]
    after = [name for name in special[text_at + 1 :] if name is not None]
    return first_id(before[-1:]), first_id(after)
