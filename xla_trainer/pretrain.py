"""Pre-training: the config's objective, backbone and teacher checked and built, then the loop
every task shares (loop.py).

Reading order: `pretrain` -> `build_job` (objective on a backbone's student, teacher, optimizer)
-> loop.run and loop.train_step -> the objective's forward in models/objectives/ (the loss)."""
import contextlib
import random

import torch

from xla_trainer_models import BACKBONES, OBJECTIVES, TargetInfo, check_pairing
from .config import Config, ConfigError
from .data import open_data
from .flops import peak_flops, train_flops_per_image
from .loop import (LogAndSaveSteps, NonFiniteSteps, Schedule, StepSettings, TrainingJob, check_drift,
                   forget_completion, hold_output_dir, make_runtime, make_schedule, open_metrics,
                   record_completion, resume, run)
from .optim import build_optimizer
from .runtime import Runtime
from .targets import TargetManifest, build_teacher


# --- checks and construction ------------------------------------------------------------------
def check_config(cfg: Config, runtime: Runtime, for_bench: bool = False):
    """Everything that can be wrong with the config, before data, models or compilation. `bench`
    needs no data, so neither data nor target locations."""
    check_models(cfg)
    t = cfg.train
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


def check_models(cfg: Config):
    """The objective and backbone entries, checked alone and as a pair."""
    try:
        objective, backbone = OBJECTIVES.get(cfg.objective.name), BACKBONES.get(cfg.backbone.name)
        backbone.check(cfg.backbone)
        check_pairing(objective, backbone)
        objective.check(cfg.objective, backbone.grid(cfg.backbone))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return objective, backbone


def build_models(cfg: Config, targets: TargetManifest | None = None):
    """(objective module, teacher or None) on the CPU, the objective initialised from
    train.seed. With precomputed targets there is no teacher: the target width and grid come
    from their manifest."""
    objective, backbone = check_models(cfg)
    teacher, info = None, None
    if objective.needs_teacher:
        teacher = None if targets else build_teacher(cfg)
        info = TargetInfo(targets.dim, tuple(targets.grid)) if targets else TargetInfo(teacher.dim, teacher.grid)
    torch.manual_seed(cfg.train.seed)
    try:
        method = objective.build(cfg.objective, backbone.student(cfg.backbone), info)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return method, teacher, info


def fsdp_blocks(cfg: Config, method) -> tuple[type, ...]:
    """The units FSDP shards and gathers one at a time: the backbone's blocks and the objective's own."""
    return BACKBONES.get(cfg.backbone.name).blocks + tuple(getattr(method, "own_blocks", ()))


def example_batch(cfg: Config, info: TargetInfo | None) -> dict:
    """One image's batch, as the step sees it (teacher targets included), for FLOP counting."""
    size = cfg.backbone.image_size
    batch = {"images": torch.zeros(1, 3, size, size)}
    if info is not None:
        batch["targets"] = torch.zeros(1, 1 + info.grid[0] * info.grid[1], info.dim)
    return batch


def build_job(cfg: Config, runtime: Runtime, schedule: Schedule, targets: TargetManifest | None = None,
              count_flops: bool | None = None) -> TrainingJob:
    """The objective on the device (wrapped for the backend), its teacher and optimizer. FLOPs
    are counted (fvcore, on the CPU first) when the device's peak is known, or when asked."""
    method, teacher, info = build_models(cfg, targets)
    flops = None
    if count_flops or (count_flops is None and peak_flops(runtime.device_kind())):
        flops = train_flops_per_image(method, None if targets else teacher, example_batch(cfg, info))
    model = runtime.wrap_model(method, fsdp_blocks(cfg, method), cfg.train.accum_steps)
    if teacher is not None:
        if cfg.runtime.precision == "bf16":
            teacher.cast_weights(torch.bfloat16)  # on the host: no cast graph on the device
        teacher = teacher.to(runtime.device)
    optimizer = build_optimizer(method, schedule.peak_lr, cfg.optim.weight_decay, cfg.optim.betas,
                                **runtime.optimizer_options())
    runtime.init_optimizer_state(optimizer)
    t = cfg.train
    return TrainingJob("pretrain", method, model, optimizer, schedule,
                       StepSettings(t.accum_steps, cfg.optim.clip_grad, t.global_batch, t.seed), teacher, flops, info)


def pretrain(cfg: Config, runtime: Runtime | None = None) -> dict:
    runtime = runtime or make_runtime(cfg)
    check_config(cfg, runtime)
    out = cfg.train.output_dir
    data = open_data(cfg, runtime)  # checked before the run directory is touched
    with hold_output_dir(runtime, out, cfg.train.take_over) as lock, contextlib.ExitStack() as closing:
        store = runtime.checkpoints(out, cfg.train.keep_checkpoints)
        closing.callback(store.close)
        if store.latest():  # a resume under another config fails before anything is built
            check_drift(store, store.latest(), cfg.to_dict(), cfg.train.allow_resume_change, "pretrain", runtime)
        schedule = make_schedule(cfg, data.num_samples)
        job = build_job(cfg, runtime, schedule, data.targets)

        def extra_state(step: int) -> dict:
            return {"step": step, "data_position": {"epoch": step // schedule.steps_per_epoch,
                                                    "batch_in_epoch": step % schedule.steps_per_epoch},
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
                    "config": cfg.to_dict()}

        start, extra = resume(store, job, extra_state(0), cfg.to_dict(), cfg.train.allow_resume_change, runtime)
        if extra:
            random.setstate(extra["rng"]["python"])
            torch.set_rng_state(extra["rng"]["torch"])
        end = min(schedule.total_steps, cfg.train.stop_at_step or schedule.total_steps)
        if runtime.is_main and start < schedule.total_steps:
            forget_completion(out)
        logger = open_metrics(runtime, out, start, cfg.to_dict())
        closing.callback(logger.close)
        batches = runtime.device_batches(data.loader(start, end))
        nonfinite = NonFiniteSteps(cfg.train.nonfinite, cfg.train.max_skipped_steps,
                                   extra.get("skipped_steps", 0) if extra else 0)
        done, last_ckpt = run(job, runtime, batches, store, logger, start=start, end=end,
                              log_and_save=LogAndSaveSteps(cfg.train.log_every, cfg.train.ckpt_every),
                              extra_state=extra_state, nonfinite=nonfinite, profile_steps=cfg.train.profile_steps,
                              output_dir=out, lock=lock)
        if runtime.is_main and done == schedule.total_steps:
            record_completion(out, "pretrain", done, schedule.total_steps)
    return {"output_dir": out, "metrics": str(logger.path), "tensorboard": str(logger.local_dir / "tb"),
            "checkpoint": last_ckpt, "steps": done, "compiles": runtime.compiles(),
            "parameter_bytes_per_device": runtime.parameter_bytes_per_device(job.step_model)}
