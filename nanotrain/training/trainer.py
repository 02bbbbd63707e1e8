"""The training loop (library): `train(cfg)` runs one job, in this process or as one torchrun rank.

The command `python -m nanotrain.train` (train.py) parses the command line and calls it.
The loop reads top to bottom, nanoGPT style: set-up, then one optimizer step per iteration
(learning rate, micro-steps with accumulation, clip, step, log, evaluate). Each feature lives
in its own module and enters here through one named seam:

    distributed.process_group / parallelize / gradient_sync   processes, DDP, FSDP, TP, no_sync
    precision.autocast / precision.scaler            bf16 and fp16
    build_data(...).train                            batches in a world-size-independent order
    train_step(...)                                  one optimizer step: accumulate, clip, judge, update
    next_token_loss                                  summed loss + valid-token count
    model(..., loss_reduction="sum", fused_loss=)    the same sum; fused: head + loss, no logits tensor
    speed.waiting_for_data / speed.report            tokens/s, MFU, peak memory, data vs compute
    schedule.lr_at / schedule_change                 warmup + cosine; a resume says how another schedule moves the lr
    run_log.log_step / log_eval / log_samples        console line and metrics.jsonl (sinks, rank 0)
    guard.check / update_skipped                     divergence: non-finite or spiking loss, skips in a row
    checkpointer.restore / maybe_save                exact resume, periodic and preemption saves
    preemption.requested                             SIGTERM/SIGINT on any rank: save and stop
"""

from __future__ import annotations

import functools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanotrain.checkpoint.checkpointer import Checkpointer, load_pretrained
from nanotrain.checkpoint.state import TrainState, seed_everything
from nanotrain.config import Config
from nanotrain.data.loader import build_data
from nanotrain.inference.evaluation import mean_loss
from nanotrain.inference.sampling import sample_completions
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.reporting import run_directory
from nanotrain.reporting.metrics import SpeedMeter
from nanotrain.reporting.run_log import RunLog, check_dashboards_installed, check_dashboards_writable
from nanotrain.reporting.run_summary import epochs, run_summary
from nanotrain.training.divergence import DivergenceGuard
from nanotrain.training.optim import Schedule, build_optimizer, schedule_change, set_lr
from nanotrain.training.preemption import Preemption
from nanotrain.training.step import train_step


@dataclass
class TrainResult:
    """What a finished run hands back to Python callers (tests, notebooks)."""

    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, at log steps
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> val loss
    model: torch.nn.Module | None = None  # the plain (unwrapped) model


def train(cfg: Config) -> TrainResult:
    """Run one training job as described by `cfg` (in this process, or as one torchrun rank)."""
    with distributed.process_group(cfg) as dims, ExitStack() as cleanup:
        return _train(cfg, dims, cleanup)


def _train(cfg: Config, dims: ParallelDims, cleanup: ExitStack) -> TrainResult:
    t = cfg.train
    log = print if dims.is_main else (lambda *args, **kwargs: None)

    # ---- set-up ---------------------------------------------------------------------------
    # Dropout differs per data-parallel rank, and is the same on the tp ranks of one, whose activations
    # are copies of each other; the weights come from build_model's seed.
    seed_everything(t.seed + dims.dp_rank)
    if dims.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    # Every rank, before anything is written: a dashboard turned on but not installed stops all ranks at once.
    check_dashboards_installed(cfg)
    run_dir = Path(t.out_dir)
    if dims.is_main:  # before anything is written: lock the run's directories, refuse to start over a run
        run_directory.claim(cfg, cleanup, log)
        check_dashboards_writable(cfg)  # a dashboard directory that is a file or read-only, before config.toml

    data = build_data(cfg, dims.dp_rank, dims.dp_size)
    for note in data.notes:
        log(f"note: {note}")
    model = build_model(cfg.model, seed=t.seed)
    if t.init_from:  # start from trained or imported weights (a resumed checkpoint still wins)
        load_pretrained(model, cfg.model, t.init_from)
    precision = Precision(t.precision, dims.device, dims.strategy)
    log(run_summary(cfg, dims, model, data, precision))  # the full config is config.toml, not the console
    model = distributed.parallelize(model, cfg, dims, precision)
    optimizer = build_optimizer(model, cfg.optim, t.lr)
    schedule = Schedule.of(cfg.to_dict())  # warmup + cosine: the learning rate of every step

    tokens_per_step = t.grad_accum_steps * dims.dp_size * t.batch_size * t.seq_len
    log(
        f"tokens per optimizer step = {t.grad_accum_steps} accum x {dims.dp_size} data-parallel "
        f"x {t.batch_size} batch x {t.seq_len} seq = {tokens_per_step:,}"
    )
    speed = SpeedMeter.for_run(cfg, dims.device, dims.world_size, tokens_per_step)  # tokens/s, MFU, memory
    log(speed.describe())
    if warmup_note := schedule.warmup_note(t.max_steps):
        log(f"note: {warmup_note}")

    train_state = TrainState()  # step, tokens seen, skipped steps: what trainer_state.json records
    checkpointer = Checkpointer(cfg, dims, data, model, optimizer, precision.scaler, train_state)
    preemption = Preemption(cfg.checkpoint.on_preempt, dims, cfg.parallel.timeout_s)  # SIGTERM/SIGINT: save and stop
    cleanup.callback(preemption.close)  # hand SIGTERM/SIGINT back however the run ends
    step = checkpointer.restore()  # 0 unless checkpoint.resume finds a checkpoint
    if checkpointer.resumed_config:  # a longer train.max_steps re-stretches the cosine: say what it does to the lr
        if change := schedule_change(checkpointer.resumed_config, cfg.to_dict(), step):
            log(change)
    if dims.is_main:  # only now that the run goes ahead: a refused resume leaves the run's config alone
        run_directory.write_config(run_dir, cfg)
    if step >= t.max_steps:
        log(f"nothing to train: the run is already at step {step} of train.max_steps={t.max_steps}; "
            "raise --train.max_steps to continue it, or pass a new --train.out_dir to start afresh")
    run_log = RunLog.for_run(cfg, dims, resumed_step=step)  # console and metrics.jsonl on rank 0
    cleanup.callback(run_log.close)
    result = TrainResult()
    train_start = last_log_time = time.perf_counter()
    last_log_step = step
    guard = DivergenceGuard(t, step, checkpointer.root)  # non-finite and spiking losses; skipped updates

    # ---- the loop: one optimizer step per iteration -----------------------------------------
    while step < t.max_steps:
        lr = schedule.lr_at(step)
        set_lr(optimizer, lr)

        # Fetch every micro-batch first: the loss is normalised by the valid tokens of the whole
        # step on all ranks, which must be known before the first backward.
        with speed.waiting_for_data():
            micro_batches = [next(data.train) for _ in range(t.grad_accum_steps)]
        # The guard judges the step before its update (and stops the run under on_nonfinite=stop).
        outcome = train_step(model, optimizer, micro_batches, dims, precision, grad_clip=cfg.optim.grad_clip,
                             fused_loss=t.fused_loss, judge=functools.partial(guard.check, step + 1))
        step_loss, norm = outcome.loss, outcome.grad_norm
        if outcome.rejected:
            log(f"step {step + 1}: {outcome.rejected}, update skipped")
            train_state.skipped_steps += 1
            guard.update_skipped(step + 1, outcome.rejected)
        elif outcome.loss_scale_drop:
            log(f"step {step + 1}: fp16 gradients overflowed, update skipped "
                f"(loss scale {outcome.loss_scale_drop[0]:g} -> {outcome.loss_scale_drop[1]:g})")
            guard.update_skipped(step + 1, "fp16 gradient overflow")
        else:
            guard.update_applied()
        step = train_state.advance(tokens_per_step)

        if step % t.log_every == 0 or step == t.max_steps:
            now = time.perf_counter()
            step_time = (now - last_log_time) / (step - last_log_step)
            record = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": norm,
                **speed.report(step - last_log_step, now - last_log_time),  # tokens/s, MFU, memory, data/compute
                "tokens_seen": step * tokens_per_step,
                "epoch": epochs(data.train.samples_consumed, cfg, data),  # None for the endless random source
                "elapsed_s": now - train_start,
                "eta_s": (t.max_steps - step) * step_time,
            }
            run_log.log_step(record)
            result.losses[step] = step_loss
            last_log_time, last_log_step = now, step

        evaluation_due = (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
        if evaluation_due and data.num_val_batches:
            val_loss, val_tokens = mean_loss(model, data.val_batches(), precision, dims, fused_loss=t.fused_loss)
            run_log.log_eval({"step": step, "val_loss": val_loss, "val_tokens": val_tokens,  # over which windows:
                              "val_windows": data.val_windows, "val_windows_total": data.val_windows_total})
            result.val_losses[step] = val_loss
            # every rank runs the sampling forwards (FSDP shards the weights); rank 0 reports
            samples = sample_completions(distributed.unwrap(model), data.tokenizer, t, precision)
            if samples:
                run_log.log_samples(step, samples)
            last_log_time = time.perf_counter()  # keep evaluation out of the throughput figure

        # Never a periodic or preemption save of weights whose newest check failed: during a run of
        # skipped steps it would replace the healthy checkpoints (the final step still saves).
        if guard.healthy or step == t.max_steps:
            preempted = preemption.requested()  # the same answer on every rank
            checkpointer.maybe_save(force=preempted)  # every checkpoint.interval steps, at the last step
            if preempted:
                log(f"preemption signal received: saved checkpoint at step {step} in {checkpointer.root}; "
                    "exiting cleanly (rerun the same command to resume)")
                break

    result.model = distributed.unwrap(model)
    return result
