"""Process group set-up and `parallelize`: the only place that knows about DDP, FSDP and tensor parallelism.

Like torchtitan's parallelize step, the model arrives here plain (model/transformer.py knows nothing of
distribution) and leaves wrapped, in this order: tensor parallelism over the mesh's tp axis
(parallel/tensor_parallel.py), activation checkpointing, compile, then data parallelism over the mesh's
dp axis (DDP, or FSDP2's `fully_shard` per block and at the root, with the mixed precision
policy parallel/precision.py produces). What the rest of the code needs
from a wrapped model goes through small named functions here: `unwrap`, `gradient_sync`,
`clip_grad_norm`, `full_state_dict`; and sums over ranks through `all_reduce_sum`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nanotrain.config import Config
from nanotrain.errors import ConfigError
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(choice: str, local_rank: int) -> torch.device:
    """One device per local rank; "auto" takes CUDA when present."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use --train.device=cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        # A launcher that sets CUDA_VISIBLE_DEVICES per process leaves each one a single device,
        # cuda:0. Otherwise LOCAL_RANK picks the device, and two ranks must never share one.
        if count > 1 and local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {count} CUDA devices are visible; "
                f"launch at most {count} processes per node (--nproc_per_node={count})"
            )
        return torch.device("cuda", local_rank if count > 1 else 0)
    return torch.device("cpu")


def resolve_strategy(strategy: str, dp_size: int) -> str:
    """parallel.strategy made concrete for `dp_size` data-parallel ranks: "auto" is ddp for several, none for one."""
    if strategy == "auto":
        return "ddp" if dp_size > 1 else "none"
    if strategy == "none" and dp_size > 1:
        raise ConfigError(
            f"parallel.strategy = 'none' with {dp_size} data-parallel ranks would train {dp_size} "
            "separate copies; use ddp or fsdp, or launch world = parallel.tp processes"
        )
    return strategy


def restart_safe_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's key-value store, with keys namespaced by restart attempt.

    After `torchrun --max-restarts` restarts a job, the agent's store still holds the previous
    attempt's keys, gloo's peer addresses among them; a restarted rank can read a dead peer's
    address and fail to connect (seen with torch 2.13). A prefix per attempt keeps them apart.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timeout,
    )
    return dist.PrefixStore(f"nanotrain/attempt_{restart_attempt()}", store)


def restart_attempt() -> int:
    """0 in a job's first attempt; 1, 2, ... in the attempts `torchrun --max-restarts` starts after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


LAUNCHER_WATCH = "nanotrain-launcher-watch"


def terminate_with_launcher(poll_s: float = 1.0) -> None:
    """Send this rank one SIGTERM when its torchrun launcher dies, however it dies (a daemon thread).

    torchrun starts every rank in a session of its own, so a SIGKILL that ends the launcher (an
    OOM kill, `kill -9`, a scheduler's hard stop) reaches no rank: they would train on, orphaned,
    and collide with the next job on their run directory. SIGTERM takes them down the preemption
    path (finish the step, save, exit), or ends them at once with `checkpoint.on_preempt = false`.
    A thread watching `os.getppid()` (an orphan is re-parented) rather than Linux's
    PR_SET_PDEATHSIG: the kernel sends that signal again each time the rank is re-parented through
    the dying launcher's threads (measured: twice in 3 of 4 trials), and a second SIGTERM means
    "stop now, without saving"; the thread also needs nothing Linux-specific. Only under torchrun
    (TORCHELASTIC_RUN_ID set): another launcher's ranks may outlive their parent on purpose. One
    thread per process, however often this is called.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or any(t.name == LAUNCHER_WATCH for t in threading.enumerate()):
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=LAUNCHER_WATCH, daemon=True).start()


def init(cfg: Config) -> ParallelDims:
    """Join the process group torchrun described in the environment (if any).

    The backend is NCCL on CUDA and gloo on CPU. The collective timeout is set from
    `parallel.timeout_s`, so a rank stuck waiting on a dead peer fails instead of hanging.
    Every rank of a group then builds the device mesh together (`ParallelDims.build_mesh`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    tp = cfg.parallel.tp
    if tp > 1 and not launched_by_torchrun():
        raise ConfigError(f"parallel.tp = {tp} needs {tp} processes: launch with "
                          f"torchrun --nproc_per_node={tp} -m nanotrain.train")
    device = pick_device(cfg.train.device, local_rank)
    dims = ParallelDims(rank, local_rank, world_size, device, cfg.parallel.strategy, tp=tp)  # checks dp x tp
    dims.strategy = resolve_strategy(dims.strategy, dims.dp_size)
    if dims.strategy != "none" and not launched_by_torchrun():
        raise ConfigError(
            f"parallel.strategy = '{dims.strategy}' needs a process group: launch with "
            "torchrun --nproc_per_node=N -m nanotrain.train"
        )
    terminate_with_launcher()
    if launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=restart_safe_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            # binds the NCCL communicator to this rank's GPU now, not at the first collective
            device_id=device if device.type == "cuda" else None,
        )
    if launched_by_torchrun() and dist.is_initialized():
        dims.build_mesh()
    return dims


@contextmanager
def process_group(cfg: Config):
    """`init(cfg)` for the length of one run; yields the ParallelDims.

    A group joined here is destroyed when the run returns. A group the caller set up already
    (a script or test running several jobs in one process) is left to the caller.
    On an exception nothing is torn down: the peers may be blocked in a collective with this
    rank, and destroying the group (NCCL's in particular) can wait on them. The exception
    propagates, the process exits non-zero, and torchrun stops the other ranks; a rank that is
    not stopped fails its pending collective after `parallel.timeout_s`.
    """
    joins_here = launched_by_torchrun() and not dist.is_initialized()
    dims = init(cfg)
    yield dims
    if joins_here:
        dist.destroy_process_group()


def torchrun_entry(main):
    """Decorate a command that may run as a torchrun rank: errors reach torchrun's summary, and the rank exits cleanly.

    Under torchrun, a rank's uncaught exception is recorded for the job summary's "Root Cause"
    section. And the rank ends with `os._exit` once `main` has returned or raised, after flushing
    its output, with the same status Python would give. Why not a normal interpreter exit: a gloo
    process group outlives `destroy_process_group()` while the device mesh or a wrapped model still
    refers to it, and its worker thread may then drop the last reference to a finished collective's
    tensor during interpreter finalization; needing the GIL there ends the thread through a
    `noexcept` destructor, std::terminate and a segmentation fault, so a finished job exited as
    failed (about 5% of runs; docs/04, "Leaving cleanly"). `os._exit` leaves no finalization for the
    thread to race with. Outside torchrun, `main` runs as it is.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    recorded = record(main)

    @functools.wraps(main)
    def entry(*args, **kwargs):
        if not launched_by_torchrun():
            return main(*args, **kwargs)
        status = 0
        try:
            recorded(*args, **kwargs)
        except SystemExit as e:
            status = exit_status(e.code)
        except BaseException:  # noqa: BLE001 - printed like the interpreter would, then the status it would give
            traceback.print_exc()
            status = 1
        leave(status)

    return entry


def exit_status(code) -> int:
    """The process status Python gives `SystemExit(code)`: None is 0, an int itself, anything else 1 (printed)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def leave(status: int) -> None:
    """End this process now with `status`, after what it printed and logged is out (no interpreter finalization)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum a tensor in place over the ranks of `group`, usually `dims.dp_group`.

    Every rank of the group must call it together. None (one process: there is no group)
    leaves the tensor as it is.
    """
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, precision: Precision | None = None) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, compile and data parallelism to a plain model.

    Under FSDP `precision`'s `fsdp_policy()` decides the dtype of the gathered parameters
    (bf16/fp16 compute, fp32 gradient reduction); without one they stay fp32. The other
    strategies get their low precision from autocast instead.
    """
    model.to(dims.device)
    if dims.tp_size > 1:  # first: the plan names the blocks' own sub-modules, before any wrapper
        from nanotrain.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.tp_mesh, cfg.parallel.sequence_parallel)
    if cfg.model.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for key, block in list(model.blocks.items()):
            # The wrapper strips its own prefix from state_dict keys, so checkpoints keep clean names.
            model.blocks[key] = checkpoint_wrapper(block, preserve_rng_state=True)
    if cfg.train.compile:
        for block in model.blocks.values():
            block.compile()  # in place: parameter names gain no "_orig_mod." prefix

    if dims.strategy == "ddp" and dims.tp_size > 1:
        return model  # DDP cannot hold DTensor parameters: gradient_sync averages the gradients itself
    if dims.strategy == "ddp":
        device_ids = [dims.device.index] if dims.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=dims.dp_group)
    if dims.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mp_policy = (precision or Precision("fp32", dims.device, dims.strategy)).fsdp_policy()
        reshard = cfg.parallel.reshard_after_forward
        for block in model.blocks.values():
            fully_shard(block, mesh=dims.dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        # The root holds the embeddings, final norm and head (and a tied embedding/head weight,
        # which must live in one FSDP group; the root is that group).
        fully_shard(model, mesh=dims.dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside a DDP wrapper (FSDP2 shards the module in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, dims: ParallelDims, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last.

    DDP's `no_sync` must cover forward and backward; FSDP2 uses `set_requires_gradient_sync`;
    a tensor-parallel model under ddp averages its gradients over dp after the last backward.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        model.set_requires_gradient_sync(enabled)
        yield
    elif dims.strategy == "ddp" and dims.tp_size > 1:
        from nanotrain.parallel.tensor_parallel import all_reduce_gradients

        yield
        if enabled:
            all_reduce_gradients(model, dims.dp_group)
    else:
        with nullcontext() if enabled or not isinstance(model, DistributedDataParallel) else model.no_sync():
            yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = measure only) and return it as a plain tensor.

    Under FSDP the gradients are sharded DTensors and so is the norm; it is made whole here
    so the loop sees the same number whatever the strategy.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The model's whole weights on the CPU, clean names, on the main rank; {} on the others.

    Every rank must call it together: under FSDP and tensor parallelism it gathers the shards (onto rank 0 only).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dims.strategy == "fsdp" or dims.tp_size > 1:  # DTensors: gathered whole onto rank 0
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dims.is_main:
        return {}
    return {name: tensor.detach().cpu() for name, tensor in get_model_state_dict(model).items()}
