"""Training and validation batches: packed or padded sequences, in one global order for any layout.

`build_data(cfg, dp_rank, dp_size)` returns a `Data` whose `train` iterator yields micro-batches
and whose `val_batches()` yields this data-parallel rank's share of the evaluation set;
`evaluation_batches(source, split, ...)` gives one process every batch `nanotrain.evaluate`
measures. A batch is a dict of CPU int64 tensors (the train loop moves them to the device):

    input_ids       (B, T)
    labels          (B, T)  the same tokens (the loss shifts them), -100 where ignored
    attention_mask  (B, T)  1 = token, 0 = padding; padded mode only

The samples come from a data source (data/sources.py: the `data.source` and `data.mode` it
reads); the files of a prepared dataset are read and validated by data/dataset_format.py.

GLOBAL ORDER CONTRACT (what makes results independent of the process layout)
    Epoch e visits the split's samples in the order of a permutation seeded with
    train.seed + e; epochs follow each other into one endless global sequence of samples
    (the random source is not shuffled: its sample i is already random). Micro-batch number k
    of data-parallel rank r (k counts every micro-batch this rank has taken, across optimizer
    steps) holds the global positions
        [k*D*B + r*B, k*D*B + r*B + B)        D = dp_size, B = train.batch_size
    so optimizer step s (micro-batches k = s*A .. s*A + A-1, A = grad_accum_steps) consumes the
    G = A*D*B consecutive positions [s*G, (s+1)*G). Ranks never overlap, and 1 process x B,
    1 x B/2 x accumulation 2, and 2 ranks x B/2 all see the same sequences in every step.
    Evaluation averages the val split's first samples, unshuffled, with the same layout: all of
    them when they hold at most WHOLE_VAL_SPLIT_TOKENS tokens, else the first eval_steps*D*B
    (`val_window_count`); the last global batch is filled up with samples that count for
    nothing, so the union over ranks, and the reduced val loss, are the same for any D with
    equal D*B (and for any layout at all when the whole split is evaluated).

`train.state_dict()` records the number of global samples consumed; `load_state_dict()` puts
the iterator back exactly there (also with a different dp_size, when D*B divides it).
Memmaps are opened lazily and reopened in each DataLoader worker (`data.num_workers > 0`);
nothing reads the whole dataset into memory. A dataset's meta.json, file sizes and document
offsets are validated once when it is opened (dataset_format's `open_meta`), and every batch is
checked for token ids outside the vocabulary before it is handed out, so damaged data stops a
run with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanotrain.config import Config
from nanotrain.data.dataset_format import TokenSplit, open_meta
from nanotrain.data.sources import DataSource, collate, open_source
from nanotrain.data.tokenizer import Tokenizer
from nanotrain.errors import DataError
from nanotrain.model.loss import IGNORE_INDEX

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
    """This data-parallel rank's micro-batches of sample indices, endless, from micro-batch `start` on."""

    def __init__(self, order: GlobalOrder, batch_size: int, dp_rank: int, dp_size: int, start: int = 0):
        self.order, self.batch_size, self.dp_rank, self.dp_size, self.start = order, batch_size, dp_rank, dp_size, start

    def indices(self, micro_batch: int) -> list[int]:
        first = micro_batch * self.dp_size * self.batch_size + self.dp_rank * self.batch_size
        return [self.order.sample(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.indices(k)
            k += 1


class TrainBatches:
    """The endless iterator of this data-parallel rank's training micro-batches, with an exact, resumable position."""

    def __init__(self, samples, order: GlobalOrder, batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.samples, self.order = samples, order
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.micro_batches = 0  # taken by the caller so far on this rank
        self._loader_iter = None  # the DataLoader's iterator; rebuilt after a position change

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_workers == 0:
            sampler = MicroBatchSampler(self.order, self.batch_size, self.dp_rank, self.dp_size)
            batch = collate([self.samples[i] for i in sampler.indices(self.micro_batches)])
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        else:
            if self._loader_iter is None:
                sampler = MicroBatchSampler(self.order, self.batch_size, self.dp_rank, self.dp_size, self.micro_batches)
                self._loader_iter = iter(torch.utils.data.DataLoader(
                    self.samples, batch_sampler=sampler, num_workers=self.num_workers,
                    collate_fn=collate, pin_memory=self.pin_memory))
            batch = next(self._loader_iter)
        self.micro_batches += 1
        return self.samples.check(batch)

    @property
    def samples_consumed(self) -> int:
        """Global samples taken by all ranks together, up to this rank's position."""
        return self.micro_batches * self.dp_size * self.batch_size

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "epoch": self.samples_consumed // self.order.num_samples,
                "samples_per_epoch": self.order.num_samples, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the layout may differ if D*B divides the position."""
        if state["samples_per_epoch"] != self.order.num_samples:
            raise DataError(
                f"loader state is for {state['samples_per_epoch']} samples per epoch but this dataset has "
                f"{self.order.num_samples}; resume with the same data, data.mode and train.seq_len"
            )
        per_micro_batch = self.dp_size * self.batch_size
        if state["samples_consumed"] % per_micro_batch:
            raise DataError(
                f"loader state sits at global sample {state['samples_consumed']}, not a multiple of "
                f"data-parallel ranks x batch_size = {per_micro_batch}; resume with a layout that divides it"
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
    _val_positions: list[list[int | None]] = field(default_factory=list)
    val_windows: int = 0  # an evaluation averages the val split's first val_windows samples ...
    val_windows_total: int | None = 0  # ... of this many (None: the random source's endless split)

    @property
    def num_val_batches(self) -> int:
        """Micro-batches val_batches() yields; 0 when the val split holds no full sample (a note says so)."""
        return len(self._val_positions)

    def val_batches(self):
        """This rank's share of the fixed evaluation set, one micro-batch per eval step, made lazily."""
        return (_val_batch(self._val_samples, positions) for positions in self._val_positions)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; on CUDA the copy overlaps compute (batches are pinned there)."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def build_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> Data:
    """Open (or, for data.source = "stories", build on first use) the data and check it fits the config."""
    d, t = cfg.data, cfg.train
    padded = d.mode == "padded"
    pin_memory = torch.cuda.is_available() and t.device != "cpu"
    per_micro_batch = dp_size * t.batch_size
    source = open_source(d, cfg.model.vocab_size, t.seed, verbose=dp_rank == 0)
    notes = fit_vocabulary(source, cfg.model.vocab_size)
    tokenizer = source.tokenizer
    train_samples, val_samples = source.samples("train", t.seq_len, padded), source.samples("val", t.seq_len, padded)

    per_step = t.grad_accum_steps * per_micro_batch
    if len(train_samples) < per_step:
        unit = "documents" if padded else f"windows of train.seq_len={t.seq_len} tokens"
        raise DataError(
            f"the train split of '{source.path}' holds {len(train_samples)} {unit}, fewer than one optimizer step "
            f"needs (grad_accum_steps x data-parallel ranks x batch_size = {per_step}); lower them or use more data"
        )
    order = GlobalOrder(len(train_samples), t.seed, shuffle=source.shuffle)
    train = TrainBatches(train_samples, order, t.batch_size, dp_rank, dp_size, d.num_workers, pin_memory)

    available = len(val_samples)
    if available == 0:
        notes.append(f"the val split of '{source.path}' holds no full sample; evaluation is skipped")
    windows = val_window_count(available, t.seq_len, t.eval_steps * per_micro_batch)
    val_positions = _val_layout(windows, t.batch_size, dp_rank, dp_size)
    endless = d.source == "random"  # its sample count is a sentinel, not a size
    return Data(train, tokenizer, source.vocab_size, source.identity, source.path, notes, val_samples, val_positions,
                windows, None if endless else available)


def fit_vocabulary(source: DataSource, model_vocab_size: int) -> list[str]:
    """Refuse data whose ids the model cannot embed; a note when embedding rows would go unused."""
    vocab = source.vocab_size
    if vocab > model_vocab_size:
        raise DataError(
            f"dataset '{source.path}' has a {vocab}-token vocabulary but model.vocab_size is {model_vocab_size}; "
            f"set --model.vocab_size={vocab}, or leave it unset and it follows the data"
        )
    if vocab < model_vocab_size:
        return [f"model.vocab_size ({model_vocab_size}) exceeds the data's {vocab}-token vocabulary: "
                f"{model_vocab_size - vocab} embedding rows never see a token "
                f"(--model.vocab_size={vocab} fits exactly)"]
    return []


@dataclass
class EvaluationBatches:
    """What `evaluation_batches` hands `nanotrain.evaluate`: the batches, and which windows they hold."""

    count: int  # batches
    batches: Iterator[dict]
    windows: int  # the split's samples they average (val: the first ones in order; train: epoch 0's first)
    windows_total: int  # the split's samples


def evaluation_batches(source: DataSource, split: str, seq_len: int, batch_size: int, padded: bool, seed: int,
                       max_batches: int = 0) -> EvaluationBatches:
    """The batches, and their windows, that measure a model on one split of `source` in one process.

    val: the split's first `max_batches` batches in order (0 = all of them, the last one partial), laid
    out as training evaluates (`val_window_count`, `_val_layout`), so `max_batches` x `batch_size` windows
    or the whole split give the val loss a run logs for those windows. train: the first `max_batches`
    full batches (0 = all) of epoch 0 in training's shuffled order for `seed`. No batches when the split
    holds no full sample.
    """
    samples = source.samples(split, seq_len, padded)
    if split == "val":
        windows = min(len(samples), max_batches * batch_size) if max_batches else len(samples)
        positions = _val_layout(windows, batch_size, 0, 1)
        return EvaluationBatches(len(positions), (_val_batch(samples, row) for row in positions), windows, len(samples))
    per_epoch = len(samples) // batch_size
    steps = min(max_batches or per_epoch, per_epoch)
    train = TrainBatches(samples, GlobalOrder(len(samples), seed, shuffle=source.shuffle), batch_size, 0, 1)
    return EvaluationBatches(steps, (next(train) for _ in range(steps)), steps * batch_size, len(samples))


# A val split whose samples hold at most this many tokens (samples x seq_len) is evaluated whole at every
# evaluation: the built-in stories' 42,880 tokens at seq_len 128 cost about as much as 7 training steps.
WHOLE_VAL_SPLIT_TOKENS = 2**16


def val_window_count(available: int, seq_len: int, wanted: int) -> int:
    """How many val samples (windows; documents in padded mode) each evaluation averages, the first ones in order.

    The whole split when its samples hold at most WHOLE_VAL_SPLIT_TOKENS tokens or number at most
    `wanted` (train.eval_steps x dp_size x batch_size); otherwise the first `wanted`.
    """
    return available if available * seq_len <= WHOLE_VAL_SPLIT_TOKENS else min(available, wanted)


def window_span(windows: int, total: int | None, split: str = "val") -> str:
    """Which windows an evaluation averaged, in words: `all 335 val windows`, `the first 160 of 335 val windows`,
    or, of an endless split (total None), `160 val windows`."""
    if total is None:
        return f"{windows:,} {split} windows"
    if windows == total:
        return f"all {total:,} {split} windows"
    return f"the first {windows:,} of {total:,} {split} windows"


def _val_layout(windows: int, batch_size: int, dp_rank: int, dp_size: int) -> list[list[int | None]]:
    """Eval micro-batch k of rank r holds val positions [k*D*B + r*B, +B); None past the last window.

    Enough micro-batches to cover `windows`; the last global batch is filled up with None, a sample
    that counts for nothing (`_val_batch`), so every rank runs the same forwards and any layout
    averages exactly the same windows.
    """
    per_micro_batch = dp_size * batch_size
    steps = -(-windows // per_micro_batch)
    return [[p if p < windows else None
             for p in range(k * per_micro_batch + dp_rank * batch_size,
                            k * per_micro_batch + (dp_rank + 1) * batch_size)]
            for k in range(steps)]


def _val_batch(samples, positions: list[int | None]) -> dict:
    """The batch of these val positions; a None position is sample 0 with every label ignored."""
    rows = [samples[p] if p is not None else _ignored(samples[0]) for p in positions]
    return samples.check(collate(rows))


def _ignored(sample: dict) -> dict:
    return {**sample, "labels": torch.full_like(sample["labels"], IGNORE_INDEX)}


def unigram_entropy(dataset_dir: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of the best context-free model.

    A language model's loss falling below it shows the model uses context, not just frequencies.
    """
    path = Path(dataset_dir)
    meta = open_meta(path)
    tokens = TokenSplit(path, split, meta).tokens
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for start in range(0, len(tokens), 2**24):  # chunks keep memory flat on large splits
        counts += np.bincount(tokens[start : start + 2**24], minlength=meta["vocab_size"])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
