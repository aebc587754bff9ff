"""`bench --baseline official`: a train step in the style of the official D-iGPT PyTorch code
(METHODS.md, D-iGPT), timed on the same config and batch as ours. It is written from that
description, not copied: eager, fp16 autocast with a GradScaler, plain AdamW, and per step what
the official loop pays per step: a dense float mask built on the host, segment orders from a CPU
randperm per sample, both copied to the device, then a loss .item() and a device synchronize."""
import math
import time

import torch

from .config import Config, ConfigError
from .loop import micro_batch, with_targets
from .optim import build_optimizer, peak_lr
from .pretrain import build_models
from .runtime import Runtime, additive_mask

BASELINES = ("official",)


def check_baseline(baseline: str, runtime: Runtime):
    """Refuse what the baseline cannot run, before any model is built."""
    if baseline not in BASELINES:
        raise ConfigError(f"unknown bench baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if runtime.backend == "xla":
        raise ConfigError("bench --baseline official runs eagerly, as the official code does; "
                          "pass runtime.backend=cuda or cpu")
    if runtime.process_count > 1:
        raise ConfigError("bench --baseline official times one process; run it without torchrun")


def bench_batch(cfg: Config, local: int, info) -> dict:
    """The host batch bench times both steps on, as the loader would deliver it; with precomputed
    targets, in their stored dtype."""
    size = cfg.backbone.image_size
    batch = {"images": torch.randn(local, 3, size, size), "skipped": torch.zeros(local, dtype=torch.bool)}
    if info is not None and cfg.targets.source == "precomputed":
        tokens = (local, 1 + info.grid[0] * info.grid[1], info.dim)
        if cfg.targets.dtype == "int8":
            batch["targets"] = torch.randint(-127, 128, tokens, dtype=torch.int8)
            batch["target_scale"] = torch.rand(tokens[:2])
        else:
            batch["targets"] = torch.randn(tokens, dtype=torch.float16)
    return batch


def randperm_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """(batch, *shape) noise on the host whose argsort over the last axis is a torch.randperm
    drawn for each sample (each row of that axis): a permutation's ranks / n sort back into it."""
    n = shape[-1]
    rows = batch * math.prod(shape[:-1])
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(rows)])
    return (orders.argsort(-1).float() / n).reshape(batch, *shape)


class OfficialStyleStep:
    """A fresh model from the config (train.seed, as ours), its own optimizer and scaler."""

    def __init__(self, cfg: Config, runtime: Runtime):
        method, teacher, self.target_info = build_models(cfg)
        self.device, self.runtime = runtime.device, runtime
        self.model = method.to(self.device)
        # as bench: with precomputed targets the batch carries them and the teacher leaves the step
        online = teacher is not None and cfg.targets.source != "precomputed"
        self.teacher = teacher.to(self.device) if online else None
        mask = getattr(method, "attn_mask", None)
        self.bool_mask = None if mask is None else mask.cpu()  # the host source of every step's float mask
        self.noise_shape = method.noise_shape
        lr = peak_lr(cfg.optim.base_lr, cfg.train.global_batch, cfg.optim.lr)
        # no runtime options: plain AdamW (foreach default, not fused) over our parameter groups
        self.optimizer = build_optimizer(method, lr, cfg.optim.weight_decay, cfg.optim.betas)
        self.scaler = torch.amp.GradScaler(self.device.type)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.accum, self.clip_grad = cfg.train.accum_steps, cfg.optim.clip_grad

    def __call__(self, host_batch: dict) -> float:
        """One optimizer step on the host batch; its loss as the host reads it back."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host_batch.items()}
        noise = None
        if self.noise_shape is not None:
            noise = randperm_noise(len(host_batch["images"]), self.noise_shape, self.generator).to(self.device)
        if self.bool_mask is not None:
            # the model is the baseline's alone: the float mask replaces its boolean buffer outright
            self.model.attn_mask = additive_mask(self.bool_mask).to(self.device)
        loss_value = 0.0
        for i in range(self.accum):  # one official loop iteration per micro-batch
            micro = {k: micro_batch(v, i, self.accum) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.float16):
                loss = self.model(with_targets(micro, self.teacher),
                                  None if noise is None else micro_batch(noise, i, self.accum))["loss"]
            self.scaler.scale(loss / self.accum).backward()
            loss_value += loss.item() / self.accum
            self.runtime.synchronize()
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value


def official_style_bench(cfg: Config, runtime: Runtime, steps: int, warmup: int, batch: dict | None = None) -> dict:
    """images_per_sec and ms_per_step of the official-style step over `steps` steps after `warmup`
    on `batch` (a host batch; by default one as bench makes), and the loss of every step."""
    check_baseline("official", runtime)
    step = OfficialStyleStep(cfg, runtime)
    if batch is None:
        batch = bench_batch(cfg, cfg.train.global_batch, step.target_info)
    losses = [step(batch) for _ in range(warmup)]
    start = time.perf_counter()  # every step ends in a synchronize: no wait needed before the clock
    losses += [step(batch) for _ in range(steps)]
    seconds = time.perf_counter() - start
    return {"images_per_sec": steps * cfg.train.global_batch / seconds, "ms_per_step": 1000 * seconds / steps,
            "losses": losses}
