"""AdamW with the usual decay exclusions and the per-iteration warmup + half-cycle cosine."""
import math

import torch
from timm.optim import param_groups_weight_decay


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas,
                    **options) -> torch.optim.AdamW:
    # no decay on biases and 1-D parameters (norms), as in the official recipe
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **options)


def peak_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / 256


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from peak/warmup_steps, then half-cycle cosine from peak to min_lr."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
