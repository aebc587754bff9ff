"""The loop every task shares (pre-training, supervised training, fine-tuning, probes): one train
step for every backend and every objective, and around it the schedule, logging, checkpoints,
resume (with its config check), the run lock, SIGTERM / SIGINT, non-finite steps and profiling.

Reading order: `run` (the loop) -> `train_step` (one optimizer step) -> the objective's forward
in models/ (the loss). Device specifics live in runtime.py only."""
import contextlib
import datetime
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm import tqdm

from .checkpoint import READ_ERRORS
from .config import ConfigError
from .data import remote_io
from .drift import check_resume, identity
from .flops import peak_flops
from .metrics import MetricsLogger
from .optim import clip_and_step, lr_at, lr_at_epoch, peak_lr, set_lr
from .runlock import RunLock
from .runtime import Runtime, create_runtime

log = logging.getLogger(__name__)


def make_runtime(cfg) -> Runtime:
    """The runtime cfg.runtime asks for; a setting it refuses is a ConfigError."""
    try:
        return create_runtime(**asdict(cfg.runtime))
    except ValueError as e:
        raise ConfigError(str(e)) from None

@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    warmup_from: float = 0.0
    unit: str = "step"  # optim.schedule_unit: step | epoch (constant within an epoch, timm's per-epoch cosine)
    warmup_epochs: float = 0.0  # unit=epoch: the warmup in epochs, as configured (not rounded to steps)

    def lr(self, step: int) -> float:
        if self.unit == "epoch":
            return lr_at_epoch(step // self.steps_per_epoch, self.peak_lr, self.warmup_epochs,
                               self.total_steps // self.steps_per_epoch, self.min_lr, self.warmup_from)
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr, self.warmup_from)


def make_schedule(cfg, dataset_len: int) -> Schedule:
    """Warmup + cosine of cfg.optim over cfg.train.epochs of `dataset_len` images, per iteration or
    per epoch (cfg.optim.schedule_unit)."""
    steps_per_epoch = dataset_len // cfg.train.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {dataset_len} images, fewer than train.global_batch "
                          f"{cfg.train.global_batch}")
    return Schedule(steps_per_epoch, steps_per_epoch * cfg.train.epochs,
                    round(steps_per_epoch * cfg.optim.warmup_epochs),
                    peak_lr(cfg.optim.base_lr, cfg.train.global_batch, cfg.optim.lr), cfg.optim.min_lr,
                    cfg.optim.warmup_from, cfg.optim.schedule_unit, cfg.optim.warmup_epochs)


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
    (an objective: forward(batch, noise) -> losses) names the noise it wants; `ema(applied)`
    updates a moving average of the weights after the update, in the same graph. A step whose
    loss, gradients or update are not finite changes nothing ("applied" is false; see
    optim.clip_and_step). Returns device scalars only: nothing here reads a value back to the host."""
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
    # every process applies or skips the update alike (DDP: the loss is per process)
    loss_finite = runtime.all_processes_in_step(torch.isfinite(totals["loss"]))
    grad_norm, applied = clip_and_step(model, optimizer, settings.clip_grad, loss_finite)
    metrics = {**totals, "grad_norm": grad_norm, "applied": applied}
    if ema is not None:
        ema(applied)
    if "skipped" in batch:
        metrics["skipped_images"] = batch["skipped"].sum()
    return metrics


def step_function(job: "TrainingJob", runtime: Runtime, name: str):
    """train_step as the runtime runs it for `job`: compiled (XLA: traced at every call, one
    graph), or with runtime.dynamo_step traced once and replayed (dynamo_step.py)."""
    if runtime.dynamo_step:
        from .dynamo_step import DynamoStep  # it builds on this module's step parts
        return DynamoStep(job, runtime)
    return runtime.compile_fn(train_step, name)


# --- around the step ----------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """Non-finite steps the run may not go on past (train.nonfinite): exit 3."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT): the run saved its step and stops; exit 130."""


class RunLockLost(RuntimeError):
    """Another launch took the output_dir's run lock over: this run stops without saving."""


class StopSignals:
    """SIGTERM (spot TPU reclaim, Slurm time limit) and SIGINT (Ctrl-C) ask the run to finish its
    step, save and exit; a second SIGINT aborts at once, without saving. All processes must stop
    after the same step: one process agrees with itself at every step; several agree through a
    collective at log steps, where they synchronise anyway."""

    def __init__(self, runtime: Runtime, every: int):
        self.runtime, self.every, self.received = runtime, every, None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            os.write(2, b"xla-trainer: second Ctrl-C: aborting without saving\n")
            os._exit(130)
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, done: int) -> bool:
        if self.runtime.process_count == 1:
            return self.received is not None
        return done % self.every == 0 and self.runtime.any_process(self.received is not None)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFiniteSteps:
    """What the run does after steps whose update was not applied (train.nonfinite): `stop` at
    the first one, `skip` them until max_in_a_row follow each other. Checked where the step
    values are read anyway (log and checkpoint steps): the weights never took such an update, so
    reading late loses nothing, and no checkpoint is saved before the check."""

    def __init__(self, mode: str, max_in_a_row: int, skipped_before: int = 0):
        self.mode, self.max_in_a_row = mode, max_in_a_row
        self.total, self.in_a_row, self.checked = skipped_before, 0, 0

    def check(self, rows: list[tuple[int, dict]], newest_checkpoint: str | None):
        for step, metrics in rows:
            if step <= self.checked:  # a checkpoint step's rows come again at the next log step
                continue
            self.checked = step
            if metrics["applied"]:
                self.in_a_row = 0
                continue
            self.total += 1
            self.in_a_row += 1
            what = f"step {step} was not applied: loss {metrics['loss']}, grad_norm {metrics['grad_norm']}"
            saved = (f"the newest checkpoint (every tensor finite) is {newest_checkpoint}" if newest_checkpoint
                     else "no checkpoint was saved yet")
            if self.mode == "stop":
                raise TrainingDiverged(f"{what} (or its update is not finite); stopping (train.nonfinite=stop): "
                                       f"nothing newer is saved, {saved}. train.nonfinite=skip goes on past such steps")
            if self.in_a_row >= self.max_in_a_row:
                raise TrainingDiverged(f"{what}; {self.in_a_row} non-finite steps in a row (train.max_skipped_steps "
                                       f"{self.max_in_a_row}); stopping: nothing newer is saved, {saved}")
            log.warning("%s; skipped (train.nonfinite=skip, %d in a row)", what, self.in_a_row)


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


class PendingMetrics:
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
        """Losses averaged over the pending steps that were applied and over the processes (None if
        none was), the newest applied grad_norm, the pending steps' skipped images (if counted)
        summed, and their throughput."""
        rows = self.read()
        applied = [r for _, r in rows if r["applied"]]
        keys = [k for k in rows[-1][1] if k != "applied"]
        sums = runtime.sum_over_processes([sum(r[k] for r in applied) for k in keys])
        count = len(applied) * runtime.reporting_processes
        record = {k: v / count if count else None for k, v in zip(keys, sums)}
        record["grad_norm"] = applied[-1]["grad_norm"] if applied else None
        if "skipped_images" in record:
            record["skipped_images"] = sums[keys.index("skipped_images")]
        record["images_per_sec"] = len(rows) * global_batch / (time.perf_counter() - self.start)
        return record


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainingJob:
    """What the loop trains: `saved` is what checkpoints hold, `step_model` its wrapped form the
    step runs (an objective), `teacher` an optional frozen module the step feeds; `flops` per
    image (student_forward, teacher_forward, train_step) where counted. `name`: the task."""
    name: str
    saved: torch.nn.Module
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    settings: StepSettings
    teacher: torch.nn.Module | None = None
    flops: dict | None = None
    target_info: object = None  # the teacher's TargetInfo (dim, grid), for an objective with one
    ema: Callable[[torch.Tensor], None] | None = None  # updates a moving average of the weights (train.ema)


def on_main(runtime: Runtime, check: Callable[[], None]):
    """`check` run on process 0 alone (e.g. taking the run lock); a ConfigError it raises is raised
    on every process, so that none waits for the others at a collective."""
    error = None
    if runtime.is_main:
        try:
            check()
        except ConfigError as e:
            error = e
    if runtime.any_process(error is not None):
        raise error or ConfigError("process 0 refused the run (its message says why)")


@contextlib.contextmanager
def hold_output_dir(runtime: Runtime, output_dir: str, take_over: bool):
    """One writer per run directory: process 0 holds the run lock (runlock.py) while the body runs;
    a second launch on the same output_dir is a ConfigError on every process."""
    lock = RunLock(output_dir, take_over) if runtime.is_main else None
    on_main(runtime, lock.acquire if lock else lambda: None)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


COMPLETION_RECORD = "done.json"


def completion_url(output_dir: str) -> str:
    return f"{output_dir.rstrip('/')}/{COMPLETION_RECORD}"


def record_completion(output_dir: str, task: str, step: int, total_steps: int):
    """<output_dir>/done.json, written atomically once the schedule's last step is saved: how a
    supervisor (tpu_scripts/supervise.sh) knows the run needs no relaunch (an exit code alone
    cannot say: a SIGTERM'd run also exits 0)."""
    record = {"task": task, "step": step, "total_steps": total_steps,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    remote_io.write_bytes_atomic(completion_url(output_dir), json.dumps(record, indent=1).encode())


def forget_completion(output_dir: str):
    """A run with steps left to do (its schedule lengthened) moves the record an earlier, shorter
    schedule left to done.json.replaced-<UTC time> (kept, as replaced metrics rows are), so that
    nothing reads that run as finished."""
    url = completion_url(output_dir)
    if remote_io.exists(url):
        aside = remote_io.move_aside(url, "replaced")
        log.info("moved %s aside to %s: this run's schedule has steps left", url, aside)


def open_metrics(runtime: Runtime, output_dir: str, start: int, config: dict) -> MetricsLogger:
    """The run's metrics log (process 0 writes it); a refusal (another run's rows) on every process."""
    logger = None

    def open_log():
        nonlocal logger
        logger = MetricsLogger(output_dir, runtime.is_main, start, run_config=config)

    on_main(runtime, open_log)
    return logger or MetricsLogger(output_dir, False)


def check_drift(store, step: int, config: dict, allowed: list[str], task_name: str, runtime: Runtime):
    """A ConfigError if the checkpoint at `step` may not resume under `config` (drift.py); cheap:
    called before the model is built, and again for each checkpoint `resume` falls back to."""
    saved = store.saved_objects(step)
    if "config" in saved:
        processes = runtime.process_count
        check_resume(identity(saved["config"], saved.get("task", task_name), saved.get("processes", processes)),
                     identity(config, task_name, processes), allowed, store.location(step))


def resume(store, job: TrainingJob, template: dict, config: dict, allowed: list[str],
           runtime: Runtime) -> tuple[int, dict | None]:
    """(the step to start from, the saved extra state or None) from the newest intact checkpoint,
    if the run's `config` may resume it (check_drift; `allowed`: train.allow_resume_change). A
    checkpoint that cannot be read is set aside and the one before it tried."""
    failed = []
    for step in store.intact_steps():
        path = store.location(step)
        try:
            check_drift(store, step, config, allowed, job.name, runtime)
            extra, error = store.restore(step, job.saved, job.optimizer, template), None
        except ConfigError:
            raise
        except READ_ERRORS as e:
            extra, error = None, e
        if not runtime.any_process(error is not None):
            log.info("resumed from %s at step %d", path, step)
            return step, extra
        why = f"reading it failed: {error!r}" if error else "reading it failed on another process"
        log.error("checkpoint %s cannot be read (%s); trying the one before it", path, why)
        store.set_aside(step, why)
        failed.append(path)
    if failed:  # the model may hold part of one: never train on from there
        raise ConfigError(f"no checkpoint of {store.dir} could be read ({', '.join(failed)}: set aside, see the log); "
                          f"start over in a new train.output_dir")
    return 0, None


@dataclass
class LogAndSaveSteps:
    """Which steps write a metrics row and which save a checkpoint (the last step does both)."""
    log_every: int
    ckpt_every: int
    log_at_epoch_end: bool = False  # also a row at every epoch's last step (the evaluations)


def run(job: TrainingJob, runtime: Runtime, batches, store, logger: MetricsLogger, *, start: int, end: int,
        log_and_save: LogAndSaveSteps, extra_state: Callable[[int], dict], nonfinite: NonFiniteSteps,
        after_step: Callable[[int], None] | None = None, profile_steps=None, output_dir: str = "",
        lock=None) -> tuple[int, str | None]:
    """Steps [start, end) of `job` on `batches` (device batches of those steps). Returns the
    step it stopped after (end, or earlier on SIGTERM) and the newest checkpoint's location;
    raises Interrupted after saving on SIGINT, TrainingDiverged on non-finite steps it may not
    go on past, RunLockLost when another launch took the run over."""
    schedule, pending = job.schedule, PendingMetrics()
    step_fn = step_function(job, runtime, f"{job.name}_step")
    peak = peak_flops(runtime.device_kind())
    last_ckpt = store.location(start) if start else None
    total_skipped = 0.0
    bar = tqdm(total=end, initial=start, desc=job.name, disable=not runtime.is_main, dynamic_ncols=True)
    signals = StopSignals(runtime, log_and_save.log_every)
    profile = StepProfile(runtime, profile_steps, output_dir)
    job.step_model.train()
    done, stop = start, False
    try:
        for step, batch in zip(range(start, end), batches):
            profile.before(step)
            metrics = step_fn(job.step_model, job.teacher, job.optimizer, batch, schedule.lr(step), step,
                              runtime=runtime, settings=job.settings, ema=job.ema)
            profile.after(step)
            done = step + 1  # steps completed; the step number every log and message uses
            pending.add(done, metrics)
            bar.update(1)
            stop = signals.agreed(done)
            is_last = done == end or stop
            epoch_end = done % schedule.steps_per_epoch == 0
            if done % log_and_save.log_every == 0 or is_last or (log_and_save.log_at_epoch_end and epoch_end):
                if runtime.any_process(lock is not None and lock.lost):
                    raise RunLockLost(f"another launch took the run lock of {output_dir} over; this one stops "
                                      f"without saving")
                nonfinite.check(pending.read(), last_ckpt)
                record = pending.summary(runtime, job.settings.global_batch)
                skipped = record.pop("skipped_images", None)
                images_per_sec = record.pop("images_per_sec")
                row = {"step": done, "epoch": done / schedule.steps_per_epoch, **record,
                       "lr": schedule.lr(step), "images_per_sec": images_per_sec,
                       "mfu": images_per_sec * job.flops["train_step"] / (peak * runtime.num_devices)
                       if peak and job.flops else None,
                       "compiles": runtime.compiles()}
                if skipped is not None:
                    total_skipped += skipped
                    row["skipped_images"] = int(total_skipped)
                if nonfinite.mode == "skip":
                    row["skipped_steps"] = nonfinite.total
                logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}" if row["loss"] is not None else "skipped",
                                img_s=f"{images_per_sec:.1f}")
                pending = PendingMetrics()
            if after_step:
                after_step(done)
            if done % log_and_save.ckpt_every == 0 or is_last:
                nonfinite.check(pending.read(), last_ckpt)
                store.save(done, job.saved, job.optimizer,
                           {**extra_state(done), "skipped_steps": nonfinite.total, "task": job.name,
                            "processes": runtime.process_count})
                last_ckpt = store.location(done)
                logger.upload()
                runtime.barrier()
            if stop:
                log.warning("%s: saved step %d to %s; exiting (a relaunch resumes from it)", signals.received,
                            done, last_ckpt)
                break
    finally:
        signals.restore()
        batches.close()  # a run stopped early must not wait on its loader workers
        bar.close()
        store.wait()  # the newest save is whole before anything else (a divergence message names it)
    if stop and signals.received == "SIGINT":
        raise Interrupted(f"Ctrl-C: saved step {done} to {last_ckpt}; a relaunch resumes from it")
    return done, last_ckpt
