"""Optimizers, their per-step update, and the per-iteration warmup + half-cycle cosine."""
import math

import torch
from torch.distributed.tensor import DTensor
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay

from .stacked_adamw import StackedAdamW


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """The parameter names the model's optional no_weight_decay() exempts (timm's convention)."""
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's groups: no decay on biases, 1-D parameters (norms) and no_decay_names(model)."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay_names(model))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    name: str = "adamw", layer_decay: float = 1.0, momentum: float = 0.9,
                    **options) -> torch.optim.Optimizer:
    """AdamW, SGD or LARS over the trainable parameters, without decay on biases, 1-D parameters
    and the model's no_weight_decay() names. layer_decay < 1 scales each ViT layer's lr by
    layer_decay^(depth - layer) (timm's grouping, BEiT / MAE fine-tuning); `options` are the
    runtime's AdamW options (stacked on XLA: StackedAdamW; fused on CUDA), for AdamW alone."""
    if layer_decay < 1.0:
        groups = param_groups_layer_decay(model, weight_decay, no_decay_names(model), layer_decay=layer_decay)
    else:
        groups = weight_decay_groups(model, weight_decay)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    if name == "adamw" and options.pop("stacked", False):
        return StackedAdamW(groups, lr=lr, betas=tuple(betas))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **options)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return Lars(groups, lr=lr, momentum=momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, device: torch.device):
    """Every group's lr, times its lr_scale (layer decay). A capturable optimizer takes a device
    tensor, not a host float: XLA folds a float that rounds 1 - lr * wd to 1.0 (the last steps of
    the cosine) into a constant, and would recompile."""
    if optimizer.defaults.get("capturable"):
        lr = torch.tensor(lr, dtype=torch.float32, device=device)
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group["lr"] = lr * scale if scale != 1.0 else lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None,
                  loss_finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (when asked), step, clear the gradients; (the gradient norm before clipping, whether the
    update was applied). The update is applied only if the loss (`loss_finite`), the gradient norm
    and every updated parameter and optimizer state are finite; otherwise all of them keep their
    values from before the step. The choice is a select on the device, not a host read: under XLA
    it fuses into the update (no sync, one graph); on eager backends it costs one copy of the
    parameters and the optimizer state per step. StackedAdamW (XLA) does all of it in stacks of
    same-shaped tensors."""
    if isinstance(optimizer, StackedAdamW):
        return optimizer.guarded_step(clip_grad, loss_finite)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = total_norm([p.grad for p in params])
    if clip_grad:
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, grad_norm)
    before = {id(t): t.detach().clone() for t in _updated_tensors(optimizer, params)}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = _updated_tensors(optimizer, params)
    values = _updated_tensors(optimizer, params, counts=False)
    # The 1-norm is finite exactly when every value is (short of a sum past 3e38, a run long
    # diverged) and, unlike the max-norm, is defined on an empty shard: FSDP2 gives a process
    # none of a tensor whose first dimension is smaller than the mesh.
    finite = loss_finite & torch.isfinite(grad_norm) & torch.isfinite(total_norm(values, norm_type=1.0))
    # state the step created (eager backends' first step) falls back to a fresh one: zeros
    keep_unless(finite, after, [before[id(t)] if id(t) in before else torch.zeros_like(t) for t in after])
    return grad_norm, finite


def total_norm(tensors, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all `tensors` together, a plain tensor: over DTensors (FSDP2's shards) the
    global one, reduced over their mesh, so that every process clips and decides alike."""
    norm = torch.nn.utils.get_total_norm(tensors, norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def keep_unless(applied: torch.Tensor, tensors, old):
    """Each tensor set back to its `old` value unless `applied` (a device bool): in place."""
    with torch.no_grad():
        for t, o in zip(tensors, old, strict=True):
            t.copy_(torch.where(applied.to(t.device), t, o))


def _updated_tensors(optimizer: torch.optim.Optimizer, params, counts: bool = True) -> list[torch.Tensor]:
    """The parameters and every tensor of their optimizer state (`counts`: with the step
    counters), in a fixed order."""
    state = [v for p in params for k, v in optimizer.state.get(p, {}).items()
             if isinstance(v, torch.Tensor) and (counts or k != "step")]
    return [*params, *state]


def peak_lr(base_lr: float, global_batch: int, lr: float | None = None) -> float:
    """`lr` when given, else base_lr scaled linearly with the batch."""
    return lr if lr is not None else base_lr * global_batch / 256


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
          warmup_from: float = 0.0) -> float:
    """Linear warmup from warmup_from x peak (reaching peak at step warmup_steps - 1), then
    half-cycle cosine from peak to min_lr."""
    if step < warmup_steps:
        start = warmup_from * peak
        return start + (peak - start) * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_at_epoch(epoch: int, peak: float, warmup_epochs: float, epochs: int, min_lr: float = 0.0,
                warmup_from: float = 0.0) -> float:
    """The lr of a whole epoch as timm's CosineLRScheduler(t_initial=epochs, lr_min=min_lr,
    warmup_t=warmup_epochs, warmup_lr_init=warmup_from x peak, warmup_prefix=False,
    t_in_epochs=True) gives it for t = epoch: linear warmup from warmup_lr_init (epoch 0) towards
    the peak (not reached: epoch warmup_epochs - 1 has init + (w - 1) / w of the way), then the
    cosine over ALL the epochs (the warmup epochs count in its phase), min_lr from `epochs` on."""
    start = warmup_from * peak
    if epoch < warmup_epochs:
        return start + epoch * (peak - start) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))
