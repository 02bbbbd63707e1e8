"""Loading a checkpoint's pickled files without ever running code from them.

Tensors come from `torch.load(weights_only=True)` (`torch_load`); DCP's pickled `.metadata` is
read with an unpickler that admits exact (module, name) pairs of the globals DCP puts there and
sets state only on DCP's dataclasses (`_MetadataUnpickler`), and DCP items that would need
`torch.load(weights_only=False)` are refused by the load planner (nanotrain never saves any).
A file torch's restricted unpickler stops at is refused as unsafe in one line that keeps torch's
diagnosis but never its advice to load the file unrestricted (`unsafe_pickle`). docs/09,
"Safe loading".
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import warnings
from dataclasses import is_dataclass
from pathlib import Path, PosixPath

import torch

from nanotrain.errors import CheckpointError, first_line

# torch's restricted unpickler warns about a pickle protocol it did not write, just before it refuses the file.
PROTOCOL_WARNING = "Detected pickle protocol"


def dcp_failure(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException), else `error` itself."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        return error.failures[min(error.failures)][0]
    return error


def torch_load(file: Path):
    """`torch.load` restricted to tensors, containers and numbers; anything that needs more is refused in one line."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PROTOCOL_WARNING)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(unsafe_pickle(str(file), e)) from None


def unsafe_pickle(what: str, error: pickle.UnpicklingError) -> str:
    """The line refusing `what`, which torch's restricted unpickler (`weights_only=True`) stopped at.

    torch's own message goes on to explain how to load the file anyway; a checkpoint from
    elsewhere must never be loaded that way, so only its diagnosis is kept ("Unsupported
    global: GLOBAL builtins.exec ...", "Unsupported operand 149").
    """
    diagnosis = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(error))
    found = f" (torch's restricted unpickler: {diagnosis[1].strip()})" if diagnosis else ""
    return (f"refusing to load {what} as unsafe: it holds more than tensors, containers and numbers{found}, and "
            "unpickling that could run code; it was damaged or crafted: resume from a checkpoint you trust")


@functools.cache
def _metadata_globals() -> dict[tuple[str, str], object]:
    """Every global the `.metadata` of a checkpoint nanotrain writes refers to, by exact (module, name).

    Found by disassembling the `.metadata` of 1-process, DDP and FSDP saves (torch 2.13): DCP's
    dataclasses, the enum that encodes memory formats, `_StorageInfo`, `torch.Size`, dtypes,
    `_get_layout` (how torch pickles a layout: a lookup in torch's layouts) and the `PosixPath` of
    the directory saved to. Python's own `find_class` would resolve a dotted name through module
    attributes (`torch.distributed.checkpoint.metadata` + `os.system` is `os.system`); a lookup
    in this table never leaves it.
    """
    from torch.distributed.checkpoint import filesystem, metadata

    classes = (metadata.Metadata, metadata.StorageMeta, metadata.MetadataIndex, metadata.TensorStorageMetadata,
               metadata.TensorProperties, metadata.ChunkStorageMetadata, metadata._MEM_FORMAT_ENCODING)
    allowed = {("torch.distributed.checkpoint.metadata", cls.__name__): cls for cls in classes}
    allowed |= {("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
                ("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
                ("pathlib", "PosixPath"): PosixPath,
                ("pathlib._local", "PosixPath"): PosixPath}  # where Python 3.13 pickles it from
    return allowed


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's `.metadata` so that it can build DCP's metadata and nothing else.

    Globals come only from `_metadata_globals`, so a call (REDUCE, NEWOBJ) can only construct
    one of those classes, make a `torch.Size` or look up a layout: none touches a file or runs
    code. State (BUILD) may be set only on instances of DCP's dataclasses, which this load has
    just created: set on a class, a function or an enum member it would change them for the
    whole process. The pure-Python unpickler is the one whose BUILD can be checked; `.metadata`
    is small (one entry per tensor chunk), so its speed does not matter.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _metadata_globals()[module, name]
        except (KeyError, TypeError):  # TypeError: a name that is not a string
            raise pickle.UnpicklingError(
                f"global {name!r} of module {module!r} is not allowed in DCP metadata") from None

    def load_build(self):
        target = self.stack[-2]
        if isinstance(target, type) or not is_dataclass(target):
            what = target.__name__ if isinstance(target, type) else type(target).__name__
            raise pickle.UnpicklingError(f"setting the state of '{what}' is not allowed in DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_dcp_metadata(directory: Path):
    """DCP's `.metadata` in `directory`, unpickled by `_MetadataUnpickler` and checked to describe only `directory`."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = directory / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {file}: {e} (it could run code)") from None
    except Exception as e:  # malformed: a truncated stream, a wrong state for one of DCP's classes
        raise CheckpointError(f"{file} is not valid DCP metadata ({first_line(e)})") from None
    if type(metadata) is not Metadata or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file} is not valid DCP metadata (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        # DCP opens `directory / relative_path`: a path that leaves the directory would read any file
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or not (directory / name).is_file():
            raise CheckpointError(f"{file} names data file {name!r}, which is not a file in {directory}")
    if not isinstance(metadata.storage_meta, StorageMeta):
        metadata.storage_meta = StorageMeta()
    return metadata


def dcp_reader(directory: Path):
    """DCP's file reader for `directory`, reading `.metadata` with `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(directory)
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeReader(str(directory))


def dcp_planner():
    """DCP's default load planner, refusing items that would need `torch.load(weights_only=False)`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DefaultLoadPlanner would torch.load these with weights_only=False; we never save any.
            raise CheckpointError(f"refusing to load '{read_item.dest_index.fqn}' from the DCP checkpoint: "
                                  "it is a pickled object, not a tensor")

    return TensorOnlyPlanner()
