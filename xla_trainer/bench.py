"""`bench`: time the compiled train step of any config on a fixed batch already on the device, so
the figure is the step's speed, not the input pipeline's."""
import time

import torch

from .config import Config
from .flops import peak_flops, train_flops_per_image
from .optim import build_optimizer, peak_lr
from .runtime import Runtime, create_runtime
from .train import build_models, check_config, train_step


def bench(cfg: Config, steps: int = 10, warmup: int = 3, runtime: Runtime | None = None) -> dict:
    runtime = runtime or create_runtime(cfg.runtime.backend, cfg.runtime.precision, cfg.runtime.torch_compile)
    check_config(cfg, runtime)
    method, teacher = build_models(cfg)
    flops = train_flops_per_image(method, teacher, cfg.model.image_size,
                                  (1 + teacher.grid[0] * teacher.grid[1], teacher.dim))
    model = runtime.wrap_model(method)
    if cfg.runtime.precision == "bf16":
        teacher.visual.to(torch.bfloat16)
    teacher = teacher.to(runtime.device)
    optimizer = build_optimizer(method, peak_lr(cfg.optim.base_lr, cfg.train.global_batch),
                                cfg.optim.weight_decay, cfg.optim.betas, **runtime.optimizer_options())
    local = cfg.train.global_batch // runtime.process_count
    batch = {"images": torch.randn(local, 3, cfg.model.image_size, cfg.model.image_size),
             "skipped": torch.zeros(local, dtype=torch.bool)}
    step_fn = runtime.compile_step(train_step)
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
    return {"device": runtime.device_kind(), "devices": runtime.num_devices,
            "global_batch": cfg.train.global_batch, "steps": steps,
            "images_per_sec": images_per_sec, "ms_per_step": 1000 * seconds / steps,
            "gflops_per_image": flops["train_step"] / 1e9, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * runtime.num_devices) if peak else None,
            "compiles": runtime.compiles(), "compiles_after_warmup": compiles_after_warmup}
