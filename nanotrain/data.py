"""Training and validation batches: packed or padded sequences, in one global order for any world size.

`build_data(cfg, rank, world_size)` returns a `Data` whose `train` iterator yields micro-batches
and whose `val_batches()` yields this rank's share of the evaluation set. A batch is a dict of
CPU int64 tensors (the train loop moves them to the device):

    input_ids       (B, T)
    labels          (B, T)  the same tokens (the loss shifts them), -100 where ignored
    attention_mask  (B, T)  1 = token, 0 = padding; padded mode only

Samples (`data.mode`):
    packed   sample i is tokens[i*T : (i+1)*T] of the split's token stream (documents are
             concatenated, each BOS ... EOS): non-overlapping windows, nothing ignored.
    padded   sample i is document i, truncated to its first T tokens and LEFT padded with the
             tokenizer's pad id; padding has attention_mask 0 and label -100.
Sources (`data.source`): "tokens" reads a directory made by `nanotrain.prepare`; "stories"
builds the built-in corpus into a cache directory on first use and then reads it the same way;
"random" draws i.i.d. uniform tokens in [0, model.vocab_size) as a function of (seed, sample
index) alone (padded mode gives each sample a random length, so valid-token counts differ).

GLOBAL ORDER CONTRACT (what makes results independent of the process layout)
    Epoch e visits the split's samples in the order of a permutation seeded with
    train.seed + e; epochs follow each other into one endless global sequence of samples
    (the random source is not shuffled: its sample i is already random). Micro-batch number k
    of rank r (k counts every micro-batch this rank has taken, across optimizer steps) holds the
    global positions
        [k*W*B + r*B, k*W*B + r*B + B)        W = world_size, B = train.batch_size
    so optimizer step s (micro-batches k = s*A .. s*A + A-1, A = grad_accum_steps) consumes the
    G = A*W*B consecutive positions [s*G, (s+1)*G). Ranks never overlap, and 1 process x B,
    1 x B/2 x accumulation 2, and 2 ranks x B/2 all see the same sequences in every step.
    Evaluation uses the first eval_steps*W*B val samples, unshuffled, with the same layout, so
    the union over ranks, and the reduced val loss, are the same for any W with equal W*B.

`train.state_dict()` records the number of global samples consumed; `load_state_dict()` puts
the iterator back exactly there (also with a different world size, when W*B divides it).
Memmaps are opened lazily and reopened in each DataLoader worker (`data.num_workers > 0`);
nothing reads the whole dataset into memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanotrain.config import Config
from nanotrain.errors import NanotrainError
from nanotrain.loss import IGNORE_INDEX
from nanotrain.prepare import FORMAT_VERSION, prepare_stories, read_meta
from nanotrain.tokenizer import Tokenizer, TokenizerError

RANDOM_VAL_STREAM = 1  # the random source's val samples come from a stream of their own


class DataError(NanotrainError):
    """A dataset problem, described in one line that says how to fix it."""


# ----------------------------------------------------------------------------- sample sources


class TokenSplit:
    """One split of a prepared dataset: the token memmap and the document offsets, opened lazily.

    Objects are pickled into DataLoader workers without their memmaps; each worker reopens
    its own, because a file mapping must not be shared across a fork or a spawn.
    """

    def __init__(self, directory: Path, split: str, meta: dict):
        self.tokens_path = directory / meta["splits"][split]["file"]
        self.index_path = directory / meta["splits"][split]["index"]
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens = meta["splits"][split]["tokens"]
        self.num_documents = meta["splits"][split]["documents"]
        self._tokens = self._offsets = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.memmap(self.index_path, dtype=np.uint64, mode="r", shape=(self.num_documents + 1,))
        return self._offsets

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_offsets": None}


class PackedSamples(torch.utils.data.Dataset):
    """Sample i = tokens[i*T : (i+1)*T]; labels are the same tokens (the loss shifts them)."""

    def __init__(self, split: TokenSplit, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def __len__(self) -> int:
        return self.split.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> dict:
        window = torch.from_numpy(self.split.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window.clone()}


class PaddedSamples(torch.utils.data.Dataset):
    """Sample i = document i (its first T tokens), left padded, with mask and -100 labels on padding."""

    def __init__(self, split: TokenSplit, seq_len: int, pad_id: int):
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id

    def __len__(self) -> int:
        return self.split.num_documents

    def __getitem__(self, i: int) -> dict:
        start = int(self.split.offsets[i])
        end = min(int(self.split.offsets[i + 1]), start + self.seq_len)
        return left_pad(self.split.tokens[start:end].astype(np.int64), self.seq_len, self.pad_id)


class RandomSamples(torch.utils.data.Dataset):
    """I.i.d. uniform tokens; sample i depends only on (seed, stream, i), so any layout sees the same data."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int, padded: bool):
        self.vocab_size, self.seq_len, self.seed, self.stream, self.padded = vocab_size, seq_len, seed, stream, padded

    def __len__(self) -> int:
        return 2**62  # endless: positions never wrap into a second epoch

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
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


# ----------------------------------------------------------------------------- the global order


class GlobalOrder:
    """Global position -> sample index: epoch e is a permutation seeded with seed + e."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._permutations: dict[int, np.ndarray] = {}

    def sample(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
        return int(self._permutations[epoch][offset])


class MicroBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of sample indices, endless, from micro-batch `start` on."""

    def __init__(self, order: GlobalOrder, batch_size: int, rank: int, world_size: int, start: int = 0):
        self.order, self.batch_size, self.rank, self.world_size, self.start = order, batch_size, rank, world_size, start

    def indices(self, micro_batch: int) -> list[int]:
        first = micro_batch * self.world_size * self.batch_size + self.rank * self.batch_size
        return [self.order.sample(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.indices(k)
            k += 1


class TrainBatches:
    """The endless iterator of this rank's training micro-batches, with an exact, resumable position."""

    def __init__(self, samples, order: GlobalOrder, batch_size: int, rank: int, world_size: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.samples, self.order = samples, order
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.micro_batches = 0  # taken by the caller so far on this rank
        self._loader_iter = None  # the DataLoader's iterator; rebuilt after a position change

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_workers == 0:
            sampler = MicroBatchSampler(self.order, self.batch_size, self.rank, self.world_size)
            batch = collate([self.samples[i] for i in sampler.indices(self.micro_batches)])
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        else:
            if self._loader_iter is None:
                sampler = MicroBatchSampler(self.order, self.batch_size, self.rank, self.world_size, self.micro_batches)
                self._loader_iter = iter(torch.utils.data.DataLoader(
                    self.samples, batch_sampler=sampler, num_workers=self.num_workers,
                    collate_fn=collate, pin_memory=self.pin_memory))
            batch = next(self._loader_iter)
        self.micro_batches += 1
        return batch

    @property
    def samples_consumed(self) -> int:
        """Global samples taken by all ranks together, up to this rank's position."""
        return self.micro_batches * self.world_size * self.batch_size

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "epoch": self.samples_consumed // self.order.num_samples,
                "samples_per_epoch": self.order.num_samples, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the layout may differ if W*B divides the position."""
        if state["samples_per_epoch"] != self.order.num_samples:
            raise DataError(
                f"loader state is for {state['samples_per_epoch']} samples per epoch but this dataset has "
                f"{self.order.num_samples}; resume with the same data, data.mode and train.seq_len"
            )
        per_micro_batch = self.world_size * self.batch_size
        if state["samples_consumed"] % per_micro_batch:
            raise DataError(
                f"loader state sits at global sample {state['samples_consumed']}, not a multiple of "
                f"world_size x batch_size = {per_micro_batch}; resume with a layout that divides it"
            )
        self.micro_batches = state["samples_consumed"] // per_micro_batch
        self._loader_iter = None


# ----------------------------------------------------------------------------- building it all


@dataclass
class Data:
    """What the train loop needs from the data side."""

    train: TrainBatches
    tokenizer: Tokenizer | None
    vocab_size: int
    identity: dict  # what a checkpoint records to refuse resuming on different data
    path: Path | None = None  # the prepared dataset directory (None for random)
    notes: list[str] = field(default_factory=list)  # one-line remarks the loop should print once
    _val_samples: object = None
    _val_positions: list[list[int]] = field(default_factory=list)

    @property
    def num_val_batches(self) -> int:
        """Micro-batches val_batches() yields; 0 when the val split holds no full sample (a note says so)."""
        return len(self._val_positions)

    def val_batches(self):
        """This rank's share of the fixed evaluation set, one micro-batch per eval step, made lazily."""
        return (collate([self._val_samples[i] for i in positions]) for positions in self._val_positions)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; on CUDA the copy overlaps compute (batches are pinned there)."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def build_data(cfg: Config, rank: int = 0, world_size: int = 1) -> Data:
    """Open (or, for data.source = "stories", build on first use) the data and check it fits the config."""
    d, t = cfg.data, cfg.train
    padded = d.mode == "padded"
    pin_memory = torch.cuda.is_available() and t.device != "cpu"
    per_micro_batch = world_size * t.batch_size
    notes: list[str] = []

    if d.source == "random":
        train_samples = RandomSamples(cfg.model.vocab_size, t.seq_len, t.seed, 0, padded)
        val_samples = RandomSamples(cfg.model.vocab_size, t.seq_len, t.seed, RANDOM_VAL_STREAM, padded)
        order = GlobalOrder(len(train_samples), t.seed, shuffle=False)
        train = TrainBatches(train_samples, order, t.batch_size, rank, world_size, d.num_workers, pin_memory)
        identity = {"source": "random", "vocab_size": cfg.model.vocab_size, "seed": t.seed}
        val_positions = _val_layout(t.eval_steps, t.eval_steps * per_micro_batch, rank, world_size, t.batch_size)
        return Data(train, None, cfg.model.vocab_size, identity, None, notes, val_samples, val_positions)

    if d.source == "stories":
        path = prepare_stories(d.stories_count, d.stories_vocab_size, d.stories_seed, verbose=rank == 0)
    else:
        path = Path(d.path)
    meta = _open_meta(path)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise DataError(
            f"dataset '{path}' has a {meta['vocab_size']}-token vocabulary but model.vocab_size is "
            f"{cfg.model.vocab_size}; set --model.vocab_size={meta['vocab_size']}"
        )
    tokenizer = _open_tokenizer(path, meta)

    def samples(split: str):
        token_split = TokenSplit(path, split, meta)
        return PaddedSamples(token_split, t.seq_len, tokenizer.pad_id) if padded else PackedSamples(token_split, t.seq_len)

    train_samples, val_samples = samples("train"), samples("val")
    per_step = t.grad_accum_steps * per_micro_batch
    if len(train_samples) < per_step:
        unit = "documents" if padded else f"windows of train.seq_len={t.seq_len} tokens"
        raise DataError(
            f"the train split of '{path}' holds {len(train_samples)} {unit}, fewer than one optimizer step needs "
            f"(grad_accum_steps x world_size x batch_size = {per_step}); lower them or use more data"
        )
    order = GlobalOrder(len(train_samples), t.seed, shuffle=True)
    train = TrainBatches(train_samples, order, t.batch_size, rank, world_size, d.num_workers, pin_memory)

    wanted = t.eval_steps * per_micro_batch
    available = len(val_samples)
    if available == 0:
        notes.append(f"the val split of '{path}' holds no full sample; evaluation is skipped")
        val_steps = 0
    elif available < wanted:
        # full global eval batches only (at least one, repeating samples if it must), so every
        # world size with the same W*B evaluates the very same samples
        val_steps = max(1, available // per_micro_batch)
        notes.append(f"the val split holds {available} samples, fewer than train.eval_steps x world_size x "
                     f"batch_size = {wanted}; evaluating {val_steps} step(s) of {per_micro_batch} samples"
                     + (" (repeating samples)" if available < per_micro_batch else ""))
    else:
        val_steps = t.eval_steps
    val_positions = [[p % available for p in row]
                     for row in _val_layout(val_steps, val_steps * per_micro_batch, rank, world_size, t.batch_size)]

    identity = {"source": d.source, "dataset": meta["identity"], "tokenizer_sha256": meta["tokenizer"]["sha256"],
                "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
                "path": str(path)}
    return Data(train, tokenizer, meta["vocab_size"], identity, path, notes, val_samples, val_positions)


def _val_layout(steps: int, total: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Eval micro-batch k of rank r holds global val positions [k*W*B + r*B, +B)."""
    per_micro_batch = world_size * batch_size
    return [list(range(k * per_micro_batch + rank * batch_size, k * per_micro_batch + (rank + 1) * batch_size))
            for k in range(min(steps, total // per_micro_batch))]


def _open_meta(path: Path) -> dict:
    if not path.is_dir():
        raise DataError(f"data.path '{path}' does not exist; make it with `python -m nanotrain.prepare INPUT --out {path} --vocab_size N`")
    meta = read_meta(path)
    if meta is None:
        raise DataError(f"data.path '{path}' is not a prepared dataset (no readable meta.json); make it with `python -m nanotrain.prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"dataset '{path}' has format version {meta.get('format_version')}, this nanotrain reads "
                        f"{FORMAT_VERSION}; prepare it again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        for name, expected in ((info["file"], info["tokens"] * itemsize), (info["index"], (info["documents"] + 1) * 8)):
            file = path / name
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"dataset '{path}' is damaged: {name} is missing or not {expected} bytes; prepare it again")
    return meta


def _open_tokenizer(path: Path, meta: dict) -> Tokenizer:
    try:
        tokenizer = Tokenizer.load(path / meta["tokenizer"]["file"])
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
        raise DataError(f"dataset '{path}': tokenizer.model does not match the sha256 in meta.json; prepare it again")
    return tokenizer


def unigram_entropy(dataset_dir: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of the best context-free model.

    A language model's loss falling below it shows the model uses context, not just frequencies.
    """
    path = Path(dataset_dir)
    meta = _open_meta(path)
    tokens = TokenSplit(path, split, meta).tokens
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for start in range(0, len(tokens), 2**24):  # chunks keep memory flat on large splits
        counts += np.bincount(tokens[start : start + 2**24], minlength=meta["vocab_size"])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
