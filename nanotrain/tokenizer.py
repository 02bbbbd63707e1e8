"""A thin wrapper around a sentencepiece model: train one, or load any existing `.model` file.

Models trained here are byte-pair encodings with byte fallback, so any UTF-8 text encodes
(characters never seen in training become their UTF-8 bytes, `<0xF0>` ...), and they use
fixed special-token ids, the same as Llama 2's tokenizer.model plus a padding token:

    unk = 0, bos = 1, eos = 2, pad = 3

Llama 2's tokenizer.model (and other loaded models) may have no padding token. `pad_id` then
falls back to eos (or unk): padding positions are masked out by `attention_mask` and -100
labels, so which id fills them does not matter, only that it is a valid embedding row.

Training is deterministic: a single trainer thread and a fixed sampling seed, so the same
text and vocab size give a byte-identical model file (tests/test_tokenizer.py checks it).
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from nanotrain.errors import NanotrainError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
MAX_SENTENCE_BYTES = 8192  # longer training lines are cut into pieces of this size
TRAINING_SENTENCES = 2_000_000  # lines sampled for training: bounds memory on huge corpora


class TokenizerError(NanotrainError):
    """A tokenizer problem, described in one line that says how to fix it."""


class Tokenizer:
    """Encode text to token ids and back. Build with `Tokenizer.train(...)` or `Tokenizer.load(path)`."""

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        self.processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.model_bytes = model_bytes
        self.vocab_size = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.unk_id = self.processor.unk_id()
        own_pad = self.processor.pad_id()  # -1 when the model has none (Llama 2)
        self.has_pad = own_pad >= 0
        self.pad_id = own_pad if self.has_pad else (self.eos_id if self.eos_id >= 0 else self.unk_id)
        if self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer {path or '(in memory)'} has no end-of-sequence token; documents need one"
            )

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a sentencepiece `.model` file unchanged (e.g. Llama 2's tokenizer.model)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file '{path}' does not exist")
        try:
            return cls(path.read_bytes(), path)
        except RuntimeError as e:  # sentencepiece reports a bad protobuf as RuntimeError
            raise TokenizerError(f"'{path}' is not a sentencepiece model ({_first_line(e)})") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
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

    def save(self, path: str | Path) -> Path:
        """Write the model file; its bytes (and so its sha256) are unchanged."""
        path = Path(path)
        path.write_bytes(self.model_bytes)
        return path

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once on `num_threads` C++ threads (-1: all cores)."""
        return self.processor.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, sha256={self.sha256[:12]})"


def _training_lines(texts: Iterable[str]):
    for text in texts:
        for line in text.splitlines():
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                # MAX_SENTENCE_BYTES//4 characters are at most MAX_SENTENCE_BYTES bytes of UTF-8
                yield line[: MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4 :]
            if line.strip():
                yield line


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
    return f"sentencepiece could not train a tokenizer: {_first_line(error)}"
