"""Where a run's samples come from: one small class per `data.source`, behind one interface.

A source answers what the loaders (data/loader.py) and the checkpoint need:

    samples(split, seq_len, padded)  a Dataset of the split "train" or "val"; its check(batch)
                                     refuses a collated batch holding ids outside the vocabulary
    shuffle      whether training visits the samples in a permutation seeded per epoch
    tokenizer    the Tokenizer of the ids, or None (random tokens have none)
    vocab_size   every id lies in [0, vocab_size)
    identity     what a checkpoint records to refuse resuming on different data
    path         the prepared dataset directory, or None

Sources (`data.source`): "tokens" reads a directory made by `nanotrain.prepare`; "stories"
builds the built-in corpus into a cache directory on first use (data/stories.py's `prepare_stories`,
through dataset_format's writer) and then reads it the same way; "random" draws i.i.d. uniform
tokens in [0, model.vocab_size) as a function of (seed, sample index) alone (padded mode gives
each sample a random length, so valid-token counts differ).

Samples (`data.mode`):
    packed   sample i is tokens[i*T : (i+1)*T] of the split's token stream (documents are
             concatenated, each BOS ... EOS, or ... EOS where BOS and EOS are one token):
             non-overlapping windows, nothing ignored.
    padded   sample i is document i, starting with BOS (prepended here to a document stored
             as text EOS), truncated to its first T tokens and LEFT padded with the tokenizer's
             pad id; padding has attention_mask 0 and label -100.

A new source is one class with `from_config` and one entry in SOURCES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from nanotrain.config import DataConfig
from nanotrain.data.dataset_format import BOS_TEXT_EOS, TEXT_EOS, TokenSplit, open_meta, open_tokenizer
from nanotrain.data.stories import prepare_stories
from nanotrain.data.tokenizer import Tokenizer
from nanotrain.model.loss import IGNORE_INDEX

RANDOM_VAL_STREAM = 1  # the random source's val samples come from a stream of their own


# ----------------------------------------------------------------------------- samples


class TokenSamples(torch.utils.data.Dataset):
    """Samples cut from one split of a prepared dataset."""

    def __init__(self, split: TokenSplit, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def check(self, batch: dict) -> dict:
        """The collated batch, after refusing token ids outside the vocabulary (see TokenSplit.check)."""
        return self.split.check(batch)


class PackedSamples(TokenSamples):
    """Sample i = tokens[i*T : (i+1)*T]; labels are the same tokens (the loss shifts them)."""

    def __len__(self) -> int:
        return self.split.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> dict:
        window = torch.from_numpy(self.split.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window.clone()}


class PaddedSamples(TokenSamples):
    """Sample i = document i (its first T tokens), left padded, with mask and -100 labels on padding.

    `head` is what each row starts with before the stored document: BOS for documents stored as
    text EOS, so a row starts as a prompt does whatever the layout; nothing otherwise.
    """

    def __init__(self, split: TokenSplit, seq_len: int, pad_id: int, head: tuple[int, ...] = ()):
        super().__init__(split, seq_len)
        self.pad_id, self.head = pad_id, np.array(head, dtype=np.int64)

    def __len__(self) -> int:
        return self.split.num_documents

    def __getitem__(self, i: int) -> dict:
        start = int(self.split.offsets[i])
        end = min(int(self.split.offsets[i + 1]), start + self.seq_len - len(self.head))
        tokens = np.concatenate([self.head, self.split.tokens[start:end].astype(np.int64)])
        return left_pad(tokens, self.seq_len, self.pad_id)


class RandomSamples(torch.utils.data.Dataset):
    """I.i.d. uniform tokens; sample i depends only on (seed, stream, i), so any layout sees the same data."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int, padded: bool):
        self.vocab_size, self.seq_len, self.seed, self.stream, self.padded = vocab_size, seq_len, seed, stream, padded

    def __len__(self) -> int:
        return 2**62  # endless: positions never wrap into a second epoch

    def check(self, batch: dict) -> dict:
        """The batch as it is: its ids are drawn inside [0, vocab_size)."""
        return batch

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.stream, i])
        tokens = rng.integers(0, self.vocab_size, self.seq_len, dtype=np.int64)
        if not self.padded:
            window = torch.from_numpy(tokens)
            return {"input_ids": window, "labels": window.clone()}
        length = int(rng.integers(2, self.seq_len + 1))  # >= 2 so every row holds one prediction
        return left_pad(tokens[:length], self.seq_len, pad_id=0)


def left_pad(tokens: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """One padded row: padding first so the last position is always a real token (generation-style)."""
    pad = seq_len - len(tokens)
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.int64)
    input_ids[pad:] = torch.from_numpy(tokens)
    attention_mask = torch.zeros(seq_len, dtype=torch.int64)
    attention_mask[pad:] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate(samples: list[dict]) -> dict:
    """Stack samples into one batch of (B, T) tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


# ----------------------------------------------------------------------------- sources


class DataSource(Protocol):
    """The interface every source implements (see the module docstring)."""

    name: str
    shuffle: bool
    vocab_size: int
    path: Path | None

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    @property
    def identity(self) -> dict: ...

    def samples(self, split: str, seq_len: int, padded: bool) -> torch.utils.data.Dataset: ...


class TokensSource:
    """A directory made by `nanotrain.prepare`, validated in full when opened (see dataset_format.open_meta)."""

    name = "tokens"
    shuffle = True

    def __init__(self, path: Path, remedy: str = "prepare it again"):
        self.path = Path(path)
        self.meta = open_meta(self.path, remedy)
        self.vocab_size: int = self.meta["vocab_size"]
        self.remedy = remedy
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def from_config(cls, data: DataConfig, model_vocab_size: int, seed: int, verbose: bool) -> TokensSource:
        return cls(Path(data.path))

    @property
    def tokenizer(self) -> Tokenizer:
        """The dataset's tokenizer, loaded and checked against meta.json on first use."""
        if self._tokenizer is None:
            self._tokenizer = open_tokenizer(self.path, self.meta, self.remedy)
        return self._tokenizer

    @property
    def identity(self) -> dict:
        meta = self.meta
        return {"source": self.name, "dataset": meta["identity"], "tokenizer_sha256": meta["tokenizer"]["sha256"],
                "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
                "path": str(self.path)}

    def samples(self, split: str, seq_len: int, padded: bool) -> TokenSamples:
        token_split = TokenSplit(self.path, split, self.meta)
        if not padded:
            return PackedSamples(token_split, seq_len)
        head = (self.meta["bos_id"],) if self.meta.get("document_layout", BOS_TEXT_EOS) == TEXT_EOS else ()
        return PaddedSamples(token_split, seq_len, self.tokenizer.pad_id, head)


class StoriesSource(TokensSource):
    """The built-in story corpus: prepared into the cache on first use, then read like any prepared dataset."""

    name = "stories"

    @classmethod
    def from_config(cls, data: DataConfig, model_vocab_size: int, seed: int, verbose: bool) -> StoriesSource:
        path = prepare_stories(data.stories_count, data.stories_vocab_size, data.stories_seed, verbose=verbose)
        return cls(path, remedy=f"delete '{path}' and the built-in corpus is built again")


class RandomSource:
    """Uniform random tokens over the model's vocabulary: no files, no tokenizer, endless, unshuffled."""

    name = "random"
    shuffle = False  # sample i is already random
    tokenizer = None
    path = None

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.seed = vocab_size, seed
        self.identity = {"source": self.name, "vocab_size": vocab_size, "seed": seed}

    @classmethod
    def from_config(cls, data: DataConfig, model_vocab_size: int, seed: int, verbose: bool) -> RandomSource:
        return cls(model_vocab_size, seed)

    def samples(self, split: str, seq_len: int, padded: bool) -> RandomSamples:
        return RandomSamples(self.vocab_size, seq_len, self.seed, RANDOM_VAL_STREAM if split == "val" else 0, padded)


SOURCES = {source.name: source for source in (TokensSource, StoriesSource, RandomSource)}


def open_source(data: DataConfig, model_vocab_size: int, seed: int, verbose: bool = True) -> DataSource:
    """The source `data.source` names, opened (and for "stories", built on first use).

    `model_vocab_size` is the random source's vocabulary, `seed` its stream's seed; `verbose`
    lets the one process that builds the corpus report its progress.
    """
    return SOURCES[data.source].from_config(data, model_vocab_size, seed, verbose)
