"""The loop every task shares (pre-training, supervised training, fine-tuning, probes): one train
step for every backend and every objective, and around it the schedule, logging, checkpoints,
resume, SIGTERM and NaN handling, and profiling.

Reading order: `run` (the loop) -> `train_step` (one optimizer step) -> the objective's forward
in models/ (the loss). Device specifics live in runtime.py only."""
import logging
import math
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from .config import ConfigError
from .flops import peak_flops
from .metrics import MetricsLogger
from .optim import clip_and_step, lr_at, peak_lr, set_lr
from .runtime import Runtime

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    warmup_from: float = 0.0

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr, self.warmup_from)


def make_schedule(cfg, dataset_len: int) -> Schedule:
    """Per-iteration warmup + cosine of cfg.optim over cfg.train.epochs of `dataset_len` images."""
    steps_per_epoch = dataset_len // cfg.train.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {dataset_len} images, fewer than train.global_batch "
                          f"{cfg.train.global_batch}")
    return Schedule(steps_per_epoch, steps_per_epoch * cfg.train.epochs,
                    round(steps_per_epoch * cfg.optim.warmup_epochs),
                    peak_lr(cfg.optim.base_lr, cfg.train.global_batch, cfg.optim.lr), cfg.optim.min_lr,
                    cfg.optim.warmup_from)


# --- the step -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSettings:
    accum_steps: int
    clip_grad: float | None
    global_batch: int
    seed: int


def micro_batch(batch: torch.Tensor, i: int, accum: int) -> torch.Tensor:
    """Rows i, i + accum, i + 2 accum, ...: strided, so that under SPMD every device keeps its
    own rows of a batch-sharded tensor and no micro-batch needs resharding."""
    return batch if accum == 1 else batch.unflatten(0, (-1, accum)).select(1, i)


def with_targets(batch: dict, teacher) -> dict:
    """The batch with the teacher's tokens as "targets": read from the batch (precomputed, int8
    dequantised here on the device) or computed online by the teacher on the same crop. A batch
    without a teacher or stored targets passes as it is."""
    if "targets" not in batch:
        return batch if teacher is None else {**batch, "targets": teacher(batch["images"])}
    batch = dict(batch)
    targets = batch["targets"].float()
    scale = batch.pop("target_scale", None)
    batch["targets"] = targets * scale[..., None] if scale is not None else targets
    return batch


def train_step(model, teacher, optimizer, batch, lr, step, *, runtime: Runtime, settings: StepSettings,
               ema: Callable[[], None] | None = None):
    """One optimizer step over the local batch, in settings.accum_steps micro-batches. The model
    (an objective: forward(batch, noise) -> losses) names the noise it wants; `ema` updates a
    moving average of the weights after the update, in the same graph. Returns device scalars
    only: nothing here reads a value back to the host."""
    set_lr(optimizer, lr, batch["images"].device)
    shape = getattr(model, "module", model).noise_shape
    noise = None if shape is None else runtime.step_noise(shape, settings.global_batch, settings.seed, step)
    accum = settings.accum_steps
    totals = {}
    for i in range(accum):
        micro = {k: micro_batch(v, i, accum) for k, v in batch.items()}
        with runtime.no_sync(model, i == accum - 1):
            with runtime.autocast():
                losses = model(with_targets(micro, teacher), None if noise is None else micro_batch(noise, i, accum))
            (losses["loss"] / accum).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / accum
    metrics = {**totals, "grad_norm": clip_and_step(model, optimizer, settings.clip_grad)}
    if ema is not None:
        ema()
    if "skipped" in batch:
        metrics["skipped_images"] = batch["skipped"].sum()
    return metrics


# --- around the step ----------------------------------------------------------------------------
class Preemption:
    """SIGTERM (spot TPU reclaim, Slurm time limit) asks the run to finish its step, save and
    exit 0. All processes must stop after the same step: one process agrees with itself at every
    step; several agree through a collective at log steps, where they synchronise anyway."""

    def __init__(self, runtime: Runtime, every: int):
        self.runtime, self.every, self.requested = runtime, every, False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, done: int) -> bool:
        if self.runtime.process_count == 1:
            return self.requested
        return done % self.every == 0 and self.runtime.any_process(self.requested)


class StepProfile:
    """A device trace of the steps in train.profile_steps = [first, last) into <output_dir>/profile."""

    def __init__(self, runtime: Runtime, steps, output_dir: str):
        self.runtime, self.steps = runtime, steps
        self.logdir = f"{output_dir.rstrip('/')}/profile"

    def before(self, step: int):
        if self.steps and step == self.steps[0]:
            self.runtime.start_trace(self.logdir)

    def after(self, step: int):
        if self.steps and step == self.steps[1] - 1:
            self.runtime.stop_trace()
            log.info("profile of steps %d-%d written to %s", self.steps[0], step, self.logdir)


class Interval:
    """Step metrics kept on the device until a log or checkpoint step reads them."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []
        self.start = time.perf_counter()

    def add(self, step: int, metrics: dict):
        self.rows.append((step, metrics))

    def read(self) -> list[tuple[int, dict]]:
        for i, (step, metrics) in enumerate(self.rows):
            self.rows[i] = (step, {k: float(v) for k, v in metrics.items()})
        return self.rows

    def summary(self, runtime: Runtime, global_batch: int) -> dict:
        """Losses averaged over the interval and the processes, the newest grad_norm, the
        interval's skipped images (if counted) summed, and its throughput."""
        rows = self.read()
        keys = list(rows[-1][1])
        sums = runtime.sum_over_processes([sum(r[k] for _, r in rows) for k in keys])
        record = {k: v / (len(rows) * runtime.reporting_processes) for k, v in zip(keys, sums)}
        record["grad_norm"] = rows[-1][1]["grad_norm"]
        if "skipped_images" in record:
            record["skipped_images"] = sums[keys.index("skipped_images")]
        record["images_per_sec"] = len(rows) * global_batch / (time.perf_counter() - self.start)
        return record

    def check_finite(self, checkpoint_hint: str):
        for step, metrics in self.read():
            if not math.isfinite(metrics["loss"]):
                raise TrainingDiverged(f"loss is {metrics['loss']} at step {step}; stopping. "
                                       f"The last good checkpoint is kept: {checkpoint_hint}")


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class Task:
    """What the loop trains: `module` is what checkpoints hold, `model` its wrapped form the step
    runs (an objective), `teacher` an optional frozen module the step feeds; `flops` per image
    (student_forward, teacher_forward, train_step) where counted."""
    name: str
    module: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    settings: StepSettings
    teacher: torch.nn.Module | None = None
    flops: dict | None = None
    target_info: object = None  # the teacher's TargetInfo (dim, grid), for an objective with one
    ema: Callable[[], None] | None = None  # updates a moving average of the weights (train.ema)


def resume(store, task: Task, template: dict) -> tuple[int, dict | None]:
    """(the step to start from, the saved extra state or None) from the newest checkpoint."""
    start = store.latest() or 0
    if not start:
        return 0, None
    extra = store.restore(start, task.module, task.optimizer, template)
    log.info("resumed from %s at step %d", store.location(start), start)
    return start, extra


@dataclass
class Cadence:
    log_every: int
    ckpt_every: int
    log_at_epoch_end: bool = False  # also a row at every epoch's last step (the evaluations)


def run(task: Task, runtime: Runtime, batches, store, logger: MetricsLogger, *, start: int, end: int,
        cadence: Cadence, extra_state: Callable[[int], dict], after_step: Callable[[int], None] | None = None,
        profile_steps=None, output_dir: str = "") -> tuple[int, str | None]:
    """Steps [start, end) of `task` on `batches` (device batches of those steps). Returns the
    step it stopped after (end, or earlier on SIGTERM) and the newest checkpoint's location."""
    schedule, interval = task.schedule, Interval()
    step_fn = runtime.compile_fn(train_step, f"{task.name}_step")
    peak = peak_flops(runtime.device_kind())
    last_ckpt = store.location(start) if start else None
    total_skipped = 0.0
    bar = tqdm(total=end, initial=start, desc=task.name, disable=not runtime.is_main, dynamic_ncols=True)
    preemption = Preemption(runtime, cadence.log_every)
    profile = StepProfile(runtime, profile_steps, output_dir)
    task.model.train()
    done = start
    try:
        for step, batch in zip(range(start, end), batches):
            profile.before(step)
            metrics = step_fn(task.model, task.teacher, task.optimizer, batch, schedule.lr(step), step,
                              runtime=runtime, settings=task.settings, ema=task.ema)
            profile.after(step)
            done = step + 1  # steps completed; the step number every log and message uses
            interval.add(done, metrics)
            bar.update(1)
            stop = preemption.agreed(done)
            is_last = done == end or stop
            epoch_end = done % schedule.steps_per_epoch == 0
            if done % cadence.log_every == 0 or is_last or (cadence.log_at_epoch_end and epoch_end):
                interval.check_finite(last_ckpt or "none saved yet")
                record = interval.summary(runtime, task.settings.global_batch)
                skipped = record.pop("skipped_images", None)
                images_per_sec = record.pop("images_per_sec")
                row = {"step": done, "epoch": done / schedule.steps_per_epoch, **record,
                       "lr": schedule.lr(step), "images_per_sec": images_per_sec,
                       "mfu": images_per_sec * task.flops["train_step"] / (peak * runtime.num_devices)
                       if peak and task.flops else None,
                       "compiles": runtime.compiles()}
                if skipped is not None:
                    total_skipped += skipped
                    row["skipped_images"] = int(total_skipped)
                logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{images_per_sec:.1f}")
                interval = Interval()
            if after_step:
                after_step(done)
            if done % cadence.ckpt_every == 0 or is_last:
                interval.check_finite(last_ckpt or "none saved yet")
                store.save(done, task.module, task.optimizer, extra_state(done))
                last_ckpt = store.location(done)
                logger.upload()
                runtime.barrier()
            if stop:
                log.warning("SIGTERM: saved step %d to %s; exiting (a relaunch resumes from it)", done, last_ckpt)
                break
    finally:
        batches.close()  # a run stopped early must not wait on its loader workers
        bar.close()
        store.wait()  # the newest save is whole before anything else (a divergence message names it)
    return done, last_ckpt
