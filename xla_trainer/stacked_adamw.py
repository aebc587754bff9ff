"""AdamW for a traced step (XLA): clip, update and the non-finite guard on stacks of
same-shaped tensors, one traced op per shape instead of one per parameter.

Why by hand: torch_xla traces every op of the step in Python at every step. torch's AdamW on
XLA is a Python loop of about 20 ops per parameter (its multi-tensor path refuses XLA tensors
with `capturable`, torch 2.9), and the guard adds a clone, a norm and a select per tensor:
two thirds of the D-iGPT ViT-B/16 step's tracing (docs/performance.md). A ViT's 12 qkv weights
share one shape, so stacking them makes each op of the update one call for all 12.

The state (per parameter: step, exp_avg, exp_avg_sq) and the arithmetic are torch's capturable
AdamW's, so state dicts and checkpoints move between this and torch.optim.AdamW."""
import torch


class StackedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (capturable: the step counts live on the device) whose `guarded_step`
    clips, updates and guards on stacks of the parameters of one group, shape and dtype."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         capturable=True, foreach=False)

    @torch.no_grad()
    def guarded_step(self, clip_grad: float | None, loss_finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """optim.clip_and_step's contract (guarded_update's, on the gradients): clips, updates,
        clears the gradients; (the gradient norm before clipping, whether the update was applied)."""
        stacks = self.stacks(lambda p: p.grad is not None)
        grads = [torch.stack([p.grad for p in params]) for _, params in stacks]
        olds = [self.stacked_state(params) for _, params in stacks]
        grad_norm, applied, news = guarded_update([group for group, _ in stacks], grads, olds, clip_grad, loss_finite)
        for (_, params), new in zip(stacks, news):
            for targets, values in zip(self.targets(params), new):
                torch._foreach_copy_(targets, list(values.unbind(0)))
        self.zero_grad(set_to_none=True)
        return grad_norm, applied

    def stacks(self, updated) -> list[tuple[dict, list[torch.nn.Parameter]]]:
        """(group, its parameters of one shape and dtype) for every parameter `updated(p)` says
        this step updates (AdamW's: those with a gradient), in the groups' order."""
        stacks = {}
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if updated(p):
                    stacks.setdefault((i, p.shape, p.dtype), (group, []))[1].append(p)
        return list(stacks.values())

    def stacked_state(self, params) -> tuple[torch.Tensor, ...]:
        """(params, steps, exp_avg, exp_avg_sq), each stacked; zero state made for a parameter
        that has none yet (as AdamW's first step makes it)."""
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return tuple(torch.stack(ts) for ts in self.targets(params))

    def targets(self, params) -> tuple[list[torch.Tensor], ...]:
        """The tensors the stacks are written back to, in stacked_state's order."""
        states = [self.state[p] for p in params]
        return (list(params), *([s[k] for s in states] for k in ("step", "exp_avg", "exp_avg_sq")))


def guarded_update(groups: list[dict], grads: list[torch.Tensor], olds: list[tuple[torch.Tensor, ...]],
                   clip_grad: float | None, loss_finite: torch.Tensor):
    """Clip (when asked), update and guard, on stacks: `grads` and `olds` (params, steps,
    exp_avg, exp_avg_sq) per stack, `groups` their hyper-parameters. Returns (the gradient norm
    before clipping, whether the update is applied, per stack the values to keep): the update
    is kept only if the loss (`loss_finite`), the gradient norm and every updated value are
    finite, else the old values are."""
    norms = [torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads]
    grad_norm = torch.linalg.vector_norm(torch.cat(norms))  # as get_total_norm: the norm of the norms
    if clip_grad:  # as clip_grads_with_norm_
        scale = torch.clamp(clip_grad / (grad_norm + 1e-6), max=1.0)
        grads = [g * scale for g in grads]
    news = [_adamw(group, g, *old) for group, g, old in zip(groups, grads, olds)]
    total = sum(t.abs().sum() for new in news for t in new)  # the 1-norm: finite iff each value is
    applied = loss_finite & torch.isfinite(grad_norm) & torch.isfinite(total)
    kept = [tuple(torch.where(applied, n, o) for n, o in zip(new, old)) for new, old in zip(news, olds)]
    return grad_norm, applied, kept


def _adamw(group: dict, grad, param, step, exp_avg, exp_avg_sq) -> tuple[torch.Tensor, ...]:
    """torch's capturable single-tensor AdamW step (torch/optim/adam.py), op for op, on stacks:
    the new (params, steps, exp_avg, exp_avg_sq). `step` has one count per stacked parameter."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    step = step + 1
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = (exp_avg_sq * beta2).addcmul(grad, grad, value=1 - beta2)
    per_param = step.reshape(-1, *([1] * (grad.dim() - 1)))  # broadcast over each parameter's shape
    step_size_neg = -(lr / (1 - beta1 ** per_param))
    denom = exp_avg_sq.sqrt() / ((1 - beta2 ** per_param).sqrt() * step_size_neg) + eps / step_size_neg
    return param.addcdiv(exp_avg, denom), step, exp_avg, exp_avg_sq
