"""Pre-training: build from the config, then one train step for every backend.

Reading order: `pretrain` (the loop) -> `train_step` (one optimizer step) -> the method's forward
in models/ (the loss). Device specifics live in runtime.py only."""
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import models
from models.segments import SegmentLayout
from .checkpoint import check_checkpoint_format
from .config import Config, ConfigError
from .data import open_train_data
from .flops import peak_flops, train_flops_per_image
from .metrics import MetricsLogger
from .optim import build_optimizer, clip_and_step, lr_at, peak_lr, set_lr
from .runtime import Runtime, create_runtime
from .targets import TargetManifest, build_teacher

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


# --- checks and construction ------------------------------------------------------------------
def make_runtime(cfg: Config) -> Runtime:
    try:
        return create_runtime(**asdict(cfg.runtime))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_config(cfg: Config, runtime: Runtime, for_bench: bool = False):
    """Everything that can be wrong with the config, before data, models or compilation. `bench`
    needs no data, so neither data nor target locations."""
    m, t = cfg.model, cfg.train
    if len(m.segments) != 2:
        raise ConfigError(f"model.segments must be [rows, cols], got {m.segments}")
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size {m.image_size} is not a multiple of model.patch_size {m.patch_size}")
    grid = m.image_size // m.patch_size
    try:
        SegmentLayout((grid, grid), tuple(m.segments))
    except ValueError as e:
        raise ConfigError(f"model.segments: {e}") from None
    split = runtime.data_parallel_size * t.accum_steps
    if t.global_batch % split:
        raise ConfigError(
            f"train.global_batch {t.global_batch} is not divisible by data-parallel size "
            f"{runtime.data_parallel_size} x train.accum_steps {t.accum_steps}; use a multiple of {split}")
    if t.global_batch % runtime.process_count:
        raise ConfigError(f"train.global_batch {t.global_batch} must split evenly over "
                          f"{runtime.process_count} hosts")
    if t.log_every < 1 or t.ckpt_every < 1:
        raise ConfigError("train.log_every and train.ckpt_every must be >= 1")
    if for_bench:
        return
    if cfg.data.source == "shards" and not cfg.data.shards:
        raise ConfigError("data.source=shards needs data.shards, the prefix holding manifest.json")
    if cfg.targets.source == "precomputed" and (cfg.data.source != "shards" or not cfg.targets.prefix):
        raise ConfigError("targets.source=precomputed needs data.source=shards and targets.prefix "
                          "(made by `xla-trainer precompute-targets`)")


def build_models(cfg: Config, targets: TargetManifest | None = None):
    """(method, teacher) on the CPU, the method initialised from train.seed. With precomputed
    targets there is no teacher: the target width and grid come from their manifest."""
    teacher = None if targets else build_teacher(cfg)
    dim, grid = (targets.dim, tuple(targets.grid)) if targets else (teacher.dim, teacher.grid)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    try:
        method = models.create_method(
            m.method, backbone=m.backbone, image_size=m.image_size, patch_size=m.patch_size,
            width=m.width, depth=m.depth, heads=m.heads, teacher_dim=dim, teacher_grid=grid,
            segments=m.segments, taps=m.taps, decoder_width=m.decoder_width,
            decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
            shared_tap_norm=m.shared_tap_norm, cls_visible_to_last_segment=m.cls_visible_to_last_segment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return method, teacher


def place_teacher(teacher, runtime: Runtime, precision: str):
    if teacher is None:
        return None
    if precision == "bf16":
        teacher.visual.to(torch.bfloat16)  # on the host: no cast graph on the device
    return teacher.to(runtime.device)


def count_flops(method, teacher, cfg: Config, targets) -> dict:
    """Train-step FLOPs per image; `targets` (a TargetManifest or the teacher) gives the target
    shape when the teacher is not in the step."""
    grid, dim = (targets.grid, targets.dim) if targets else (teacher.grid, teacher.dim)
    return train_flops_per_image(method, teacher, cfg.model.image_size, (1 + grid[0] * grid[1], dim))


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr)


def make_schedule(cfg: Config, dataset_len: int) -> Schedule:
    steps_per_epoch = dataset_len // cfg.train.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {dataset_len} images, fewer than train.global_batch "
                          f"{cfg.train.global_batch}")
    return Schedule(steps_per_epoch, steps_per_epoch * cfg.train.epochs,
                    round(steps_per_epoch * cfg.optim.warmup_epochs),
                    peak_lr(cfg.optim.base_lr, cfg.train.global_batch), cfg.optim.min_lr)


# --- the step -----------------------------------------------------------------------------------
def micro_batch(batch: torch.Tensor, i: int, accum: int) -> torch.Tensor:
    """Rows i, i + accum, i + 2 accum, ...: strided, so that under SPMD every device keeps its
    own rows of a batch-sharded tensor and no micro-batch needs resharding."""
    return batch if accum == 1 else batch.unflatten(0, (-1, accum)).select(1, i)


def step_targets(batch: dict, teacher) -> torch.Tensor:
    """The teacher's tokens: read from the batch (precomputed, dequantised here on the device) or
    computed online by the teacher on the same crop."""
    if "targets" not in batch:
        return teacher(batch["images"])
    targets = batch["targets"].float()
    return targets * batch["target_scale"][..., None] if "target_scale" in batch else targets


def train_step(model, teacher, optimizer, batch, lr, step, *, runtime: Runtime, cfg: Config):
    """One optimizer step over the local batch, in train.accum_steps micro-batches. Returns device
    scalars only: nothing here reads a value back to the host."""
    set_lr(optimizer, lr, batch["images"].device)
    unwrapped = getattr(model, "module", model)
    noise = runtime.step_noise(unwrapped.noise_shape, cfg.train.global_batch, cfg.train.seed, step)
    accum = cfg.train.accum_steps
    totals = {}
    for i in range(accum):
        micro = {k: micro_batch(v, i, accum) for k, v in batch.items()}
        with runtime.no_sync(model, i == accum - 1):
            with runtime.autocast():
                losses = model(micro["images"], step_targets(micro, teacher), micro_batch(noise, i, accum))
            (losses["loss"] / accum).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / accum
    grad_norm = clip_and_step(model, optimizer, cfg.optim.clip_grad)
    return {**totals, "grad_norm": grad_norm, "skipped_images": batch["skipped"].sum()}


# --- the loop -----------------------------------------------------------------------------------
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


def pretrain(cfg: Config, runtime: Runtime | None = None) -> dict:
    runtime = runtime or make_runtime(cfg)
    check_config(cfg, runtime)
    check_checkpoint_format(cfg.train.output_dir, runtime.backend)
    data = open_train_data(cfg, runtime)
    schedule = make_schedule(cfg, data.num_samples)
    method, teacher = build_models(cfg, data.targets)
    flops = count_flops(method, teacher, cfg, data.targets)
    model = runtime.wrap_model(method)
    teacher = place_teacher(teacher, runtime, cfg.runtime.precision)
    optimizer = build_optimizer(method, schedule.peak_lr, cfg.optim.weight_decay, cfg.optim.betas,
                                **runtime.optimizer_options())
    runtime.init_optimizer_state(optimizer)

    out = cfg.train.output_dir
    store = runtime.checkpoints(out, cfg.train.keep_checkpoints)

    def extra_state(step: int) -> dict:
        return {"step": step, "data_position": {"epoch": step // schedule.steps_per_epoch,
                                                "batch_in_epoch": step % schedule.steps_per_epoch},
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
                "config": cfg.to_dict()}

    start_step, last_ckpt = store.latest() or 0, None
    if start_step:
        extra = store.restore(start_step, method, optimizer, extra_state(0))
        random.setstate(extra["rng"]["python"])
        torch.set_rng_state(extra["rng"]["torch"])
        last_ckpt = store.location(start_step)
        log.info("resumed from %s at step %d", last_ckpt, start_step)
    end_step = min(schedule.total_steps, cfg.train.stop_at_step or schedule.total_steps)

    batches = runtime.device_batches(data.loader(start_step, end_step))
    step_fn = runtime.compile_fn(train_step, "train_step")
    logger = MetricsLogger(out, runtime.is_main, start_step)
    peak = peak_flops(runtime.device_kind())
    total_skipped = 0.0

    def save(step):
        nonlocal last_ckpt
        store.save(step, method, optimizer, extra_state(step))
        last_ckpt = store.location(step)
        logger.upload()
        runtime.barrier()

    interval = Interval()
    bar = tqdm(total=end_step, initial=start_step, desc="pretrain", disable=not runtime.is_main,
               dynamic_ncols=True)
    preemption = Preemption(runtime, cfg.train.log_every)
    profile = StepProfile(runtime, cfg.train.profile_steps, out)
    try:
        for step, batch in zip(range(start_step, end_step), batches):
            profile.before(step)
            metrics = step_fn(model, teacher, optimizer, batch, schedule.lr(step), step, runtime=runtime, cfg=cfg)
            profile.after(step)
            done = step + 1  # steps completed; the step number every log and message uses
            interval.add(done, metrics)
            bar.update(1)
            stop = preemption.agreed(done)
            is_last = done == end_step or stop
            if done % cfg.train.log_every == 0 or is_last:
                interval.check_finite(last_ckpt or "none saved yet")
                record = interval.summary(runtime, cfg.train.global_batch)
                total_skipped += record.pop("skipped_images")
                images_per_sec = record.pop("images_per_sec")
                record = {"step": done, "epoch": done / schedule.steps_per_epoch, **record,
                          "lr": schedule.lr(step), "images_per_sec": images_per_sec,
                          "mfu": images_per_sec * flops["train_step"] / (peak * runtime.num_devices) if peak else None,
                          "compiles": runtime.compiles(), "skipped_images": int(total_skipped)}
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{images_per_sec:.1f}")
                interval = Interval()
            if done % cfg.train.ckpt_every == 0 or is_last:
                interval.check_finite(last_ckpt or "none saved yet")
                save(done)
            if stop:
                log.warning("SIGTERM: saved step %d to %s; exiting (a relaunch resumes from it)", done, last_ckpt)
                end_step = done
                break
    finally:
        batches.close()  # a run stopped early must not wait on its loader workers
    bar.close()
    store.close()
    logger.close()
    summary = {"output_dir": out, "metrics": str(logger.path), "tensorboard": str(logger.local_dir / "tb"),
               "checkpoint": last_ckpt, "steps": end_step, "compiles": runtime.compiles(),
               "parameter_bytes_per_device": runtime.parameter_bytes_per_device(model)}
    return summary
