"""`bench`: time the compiled train step of any config on a fixed batch already on the device, so
the figure is the step's speed, not the input pipeline's. With targets.source=precomputed the
batch carries stored-dtype targets and the teacher leaves the step."""
import time

import torch

from .config import Config
from .data import open_train_data
from .flops import peak_flops
from .optim import build_optimizer, peak_lr
from .runtime import Runtime, create_runtime
from .train import build_models, check_config, count_flops, make_runtime, place_teacher, train_step


def bench(cfg: Config, steps: int = 10, warmup: int = 3, runtime: Runtime | None = None) -> dict:
    runtime = runtime or make_runtime(cfg)
    check_config(cfg, runtime, for_bench=True)
    precomputed = cfg.targets.source == "precomputed"
    method, teacher = build_models(cfg)
    local = cfg.train.global_batch // runtime.process_count
    batch = {"images": torch.randn(local, 3, cfg.model.image_size, cfg.model.image_size),
             "skipped": torch.zeros(local, dtype=torch.bool)}
    if precomputed:  # what the target shards would deliver, in their stored dtype
        tokens = (local, 1 + teacher.grid[0] * teacher.grid[1], teacher.dim)
        if cfg.targets.dtype == "int8":
            batch["targets"] = torch.randint(-127, 128, tokens, dtype=torch.int8)
            batch["target_scale"] = torch.rand(tokens[:2])
        else:
            batch["targets"] = torch.randn(tokens, dtype=torch.float16)
        flops = count_flops(method, None, cfg, teacher)
        teacher = None
    else:
        flops = count_flops(method, teacher, cfg, None)
    model = runtime.wrap_model(method)
    teacher = place_teacher(teacher, runtime, cfg.runtime.precision)
    optimizer = build_optimizer(method, peak_lr(cfg.optim.base_lr, cfg.train.global_batch),
                                cfg.optim.weight_decay, cfg.optim.betas, **runtime.optimizer_options())
    step_fn = runtime.compile_fn(train_step, "train_step")
    lr = peak_lr(cfg.optim.base_lr, cfg.train.global_batch)
    start = None
    for step, device_batch in enumerate(runtime.device_batches([batch] * (warmup + steps))):
        metrics = step_fn(model, teacher, optimizer, device_batch, lr, step, runtime=runtime, cfg=cfg)
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
            "parameter_bytes_per_device": runtime.parameter_bytes_per_device(model)}


def bench_data(cfg: Config, batches: int = 20, warmup: int = 2) -> dict:
    """Images/s of the input pipeline alone (decode, crop, targets) in this process and its
    data.num_workers loader workers, as one host of a run would read."""
    runtime = create_runtime("cpu", cfg.runtime.precision)
    check_config(cfg, runtime)
    data = open_train_data(cfg, runtime)
    loader = iter(data.loader(0, warmup + batches))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    images = sum(len(next(loader)["images"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    cores = max(1, cfg.data.num_workers)
    return {"source": cfg.data.shards or cfg.data.root or cfg.data.source, "targets": cfg.targets.source,
            "workers": cfg.data.num_workers, "images": images, "images_per_sec": images / seconds,
            "images_per_sec_per_core": images / seconds / cores}
