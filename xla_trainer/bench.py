"""`bench`: time the compiled train step of any config on a fixed batch already on the device, so
the figure is the step's speed, not the input pipeline's. With targets.source=precomputed the
batch carries stored-dtype targets and the teacher leaves the step. With a baseline
(bench_official.py), a step written as another codebase trains is timed after ours, on the same
config and batch."""
import gc
import time

from .bench_official import bench_batch, check_baseline, official_style_bench
from .config import Config
from .data import open_data
from .flops import peak_flops, step_flops
from .loop import Schedule, make_runtime, train_step
from .optim import peak_lr
from .pretrain import build_job, check_config
from .runtime import Runtime, create_runtime


def bench(cfg: Config, steps: int = 10, warmup: int = 3, runtime: Runtime | None = None,
          baseline: str | None = None) -> dict:
    runtime = runtime or make_runtime(cfg)
    check_config(cfg, runtime, for_bench=True)
    if baseline is not None:
        check_baseline(baseline, runtime)  # before either model is built
    result, batch = time_our_step(cfg, runtime, steps, warmup)
    if baseline is None:
        return result
    gc.collect()  # our model is gone with time_our_step: its memory goes back before the baseline builds its own
    runtime.free_memory()
    theirs = official_style_bench(cfg, runtime, steps, warmup, batch)
    return {**result, "baseline": baseline, "baseline_images_per_sec": theirs["images_per_sec"],
            "baseline_ms_per_step": theirs["ms_per_step"],
            "speedup_vs_baseline": result["images_per_sec"] / theirs["images_per_sec"]}


def time_our_step(cfg: Config, runtime: Runtime, steps: int, warmup: int) -> tuple[dict, dict]:
    """(the report of our compiled step, the host batch it ran on)."""
    lr = peak_lr(cfg.optim.base_lr, cfg.train.global_batch, cfg.optim.lr)
    schedule = Schedule(1, warmup + steps, 0, lr, lr)  # the peak lr throughout
    job = build_job(cfg, runtime, schedule, count_flops=True)
    flops = job.flops
    if job.teacher is not None and cfg.targets.source == "precomputed":  # the teacher leaves the step
        job.teacher = None
        flops = step_flops(flops["student_forward"])
    batch = bench_batch(cfg, cfg.train.global_batch // runtime.process_count, job.target_info)
    step_fn = runtime.compile_fn(train_step, "train_step")
    start = None
    for step, device_batch in enumerate(runtime.device_batches([batch] * (warmup + steps))):
        metrics = step_fn(job.step_model, job.teacher, job.optimizer, device_batch, lr, step, runtime=runtime,
                          settings=job.settings)
        if step == warmup - 1:
            float(metrics["loss"])  # wait for the warm-up steps before the clock starts
            compiles_after_warmup = runtime.compiles()
            start = time.perf_counter()
    float(metrics["loss"])
    seconds = time.perf_counter() - start
    images_per_sec = steps * cfg.train.global_batch / seconds
    achieved = images_per_sec * flops["train_step"]
    peak = peak_flops(runtime.device_kind())
    return {"device": runtime.device_kind(), "devices": runtime.num_devices, "targets": cfg.targets.source,
            "global_batch": cfg.train.global_batch, "steps": steps,
            "images_per_sec": images_per_sec, "ms_per_step": 1000 * seconds / steps,
            "gflops_per_image": flops["train_step"] / 1e9, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * runtime.num_devices) if peak else None,
            "compiles": runtime.compiles(), "compiles_after_warmup": compiles_after_warmup,
            "parameter_bytes_per_device": runtime.parameter_bytes_per_device(job.step_model)}, batch


def bench_data(cfg: Config, batches: int = 20, warmup: int = 2) -> dict:
    """Images/s of the input pipeline alone (decode, crop, targets) in this process and its
    data.num_workers loader workers, as one host of a run would read."""
    runtime = create_runtime("cpu", cfg.runtime.precision)
    check_config(cfg, runtime)
    data = open_data(cfg, runtime)
    loader = iter(data.loader(0, warmup + batches))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    images = sum(len(next(loader)["images"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    workers = runtime.loader_workers(cfg.data.num_workers)
    return {"source": cfg.data.shards or cfg.data.root or cfg.data.source, "targets": cfg.targets.source,
            "workers": workers, "images": images, "images_per_sec": images / seconds,
            "images_per_sec_per_core": images / seconds / max(1, workers)}
