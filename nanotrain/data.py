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
nothing reads the whole dataset into memory. A dataset's meta.json, file sizes and document
offsets are validated once when it is opened (`open_meta`), and every batch is checked for token
ids outside the vocabulary before it is handed out, so damaged data stops a run with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanotrain.config import Config
from nanotrain.errors import NanotrainError
from nanotrain.loss import IGNORE_INDEX
from nanotrain.prepare import FORMAT_VERSION, SPLITS, prepare_stories, read_meta
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
        self.vocab_size = meta["vocab_size"]
        self._tokens = self._offsets = None

    def check(self, batch: dict) -> dict:
        """The batch, unless it holds a token id outside the vocabulary (a damaged or tampered .bin).

        One max over the batch, in the training process (an error raised in a DataLoader worker
        would arrive wrapped in its traceback): the id never reaches the embedding.
        """
        largest = int(batch["input_ids"].max())
        if largest >= self.vocab_size:
            raise DataError(
                f"'{self.tokens_path}' holds token id {largest}, outside the dataset's {self.vocab_size}-token "
                "vocabulary: the file is damaged; prepare the dataset again"
            )
        return batch

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
    """Sample i = document i (its first T tokens), left padded, with mask and -100 labels on padding."""

    def __init__(self, split: TokenSplit, seq_len: int, pad_id: int):
        super().__init__(split, seq_len)
        self.pad_id = pad_id

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
        return self.samples.check(batch)

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
        return (self._val_samples.check(collate([self._val_samples[i] for i in positions]))
                for positions in self._val_positions)


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
        remedy = f"delete '{path}' and the built-in corpus is built again"
    else:
        path, remedy = Path(d.path), "prepare it again"
    meta = open_meta(path, remedy)
    vocab, model_vocab = meta["vocab_size"], cfg.model.vocab_size
    if vocab > model_vocab:
        raise DataError(
            f"dataset '{path}' has a {vocab}-token vocabulary but model.vocab_size is {model_vocab}; "
            f"set --model.vocab_size={vocab}, or leave it unset and it follows the data"
        )
    if vocab < model_vocab:
        notes.append(f"model.vocab_size ({model_vocab}) exceeds the data's {vocab}-token vocabulary: "
                     f"{model_vocab - vocab} embedding rows never see a token "
                     f"(--model.vocab_size={vocab} fits exactly)")
    tokenizer = _open_tokenizer(path, meta, remedy)

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


def dataset_vocab_size(path: str | Path) -> int:
    """The vocabulary of the prepared dataset at `path`: what model.vocab_size follows when not set."""
    return open_meta(Path(path))["vocab_size"]


def open_meta(path: Path, remedy: str = "prepare it again") -> dict:
    """The dataset's meta.json, once checked in full against what the reader relies on.

    Every field the loader uses is validated here, and the files' sizes and document offsets
    against it, so a damaged or hand-edited dataset is refused in one line at start-up;
    `remedy` says how to get a good one.
    """
    if not path.exists():
        raise DataError(f"data.path '{path}' does not exist; make it with `python -m nanotrain.prepare INPUT --out {path} --vocab_size N`")
    if not path.is_dir():
        raise DataError(f"data.path '{path}' is a file, not a directory; "
                        "pass the directory `python -m nanotrain.prepare --out DIR` made")
    meta = read_meta(path)
    if meta is None:
        raise DataError(f"data.path '{path}' is not a prepared dataset (no readable meta.json); make it with `python -m nanotrain.prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"dataset '{path}' has format version {meta.get('format_version')}, this nanotrain reads "
                        f"{FORMAT_VERSION}; prepare it again")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"dataset '{path}' is damaged: meta.json {problem}; {remedy}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        info = meta["splits"][split]
        for name, expected in ((info["file"], info["tokens"] * itemsize), (info["index"], (info["documents"] + 1) * 8)):
            file = path / name
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"dataset '{path}' is damaged: {name} is missing or not {expected} bytes; {remedy}")
        if not _offsets_are_documents(path / info["index"], info["tokens"]):
            raise DataError(f"dataset '{path}' is damaged: {info['index']} does not hold increasing document "
                            f"offsets from 0 to {info['tokens']}; {remedy}")
    return meta


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json unusable (the reader trusts every field it uses), or None."""
    vocab = meta.get("vocab_size")
    if not _is_count(vocab) or vocab == 0:
        return f"has vocab_size {vocab!r}, not a positive integer"
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32") or np.iinfo(dtype).max < vocab - 1:
        return f"has dtype {dtype!r}, not uint16 or uint32 wide enough for {vocab} token ids"
    if not isinstance(meta.get("identity"), str) or not meta["identity"]:
        return f"has identity {meta.get('identity')!r}, not a hash string"
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or not _is_file_name(tokenizer.get("file")) \
            or not isinstance(tokenizer.get("sha256"), str):
        return f"has tokenizer {tokenizer!r}, not a file name in the dataset and its sha256"
    recorded_ids = ["bos_id", "eos_id", "pad_id"] + (["max_token_id"] if "max_token_id" in meta else [])
    for key in recorded_ids:  # (datasets prepared before max_token_id was recorded lack it; batches are checked)
        if not (_is_count(meta.get(key)) and meta[key] < vocab):
            return f"has {key} {meta.get(key)!r}, not a token id below vocab_size {vocab}"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(split), dict) for split in SPLITS):
        return f"has no 'splits' entries {' and '.join(map(repr, SPLITS))}"
    for split in SPLITS:
        info = splits[split]
        if not (_is_file_name(info.get("file")) and _is_file_name(info.get("index"))
                and _is_count(info.get("tokens")) and _is_count(info.get("documents"))
                and info["documents"] <= info["tokens"]):
            return f"has splits.{split} = {info!r}, not file and index names with document and token counts"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_file_name(value) -> bool:
    """A plain name of a file inside the dataset directory: meta.json never points elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _offsets_are_documents(index_path: Path, num_tokens: int) -> bool:
    """Offsets start at 0, end at the token count and strictly increase (each document holds BOS and EOS).

    A decreasing pair would make an empty, fully masked padded row; read in chunks to keep memory flat.
    """
    offsets = np.memmap(index_path, dtype=np.uint64, mode="r")
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        return False
    chunk = 2**24
    # neighbouring blocks share an entry, so every pair is compared
    blocks = (offsets[i : i + chunk + 1] for i in range(0, len(offsets) - 1, chunk))
    return all(bool((block[1:] > block[:-1]).all()) for block in blocks)


def _open_tokenizer(path: Path, meta: dict, remedy: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer.load(path / meta["tokenizer"]["file"])
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
        raise DataError(f"dataset '{path}': tokenizer.model does not match the sha256 in meta.json; {remedy}")
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"dataset '{path}' is damaged: its tokenizer has {tokenizer.vocab_size} tokens but meta.json "
                        f"says vocab_size {meta['vocab_size']}; {remedy}")
    return tokenizer


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
