"""runtime.dynamo_step (XLA): the train step traced once by dynamo into one XLA graph and replayed
at every step, instead of re-traced op by op in Python at every step (loop.train_step).

Why: torch_xla's lazy tensors run the step's Python at every step to rebuild its graph (forward,
backward, update: about 110 ms of host CPU for D-iGPT ViT-B/16 on the test VM, 0.6 of a v5p
chip's step); a replay costs dynamo's guard checks and the hand-over of the step's tensors (about
40 ms there; docs/performance.md).

The step is written as a function of its tensors: gradients by torch.func.grad_and_value of the
objective under torch.func.functional_call, the update by stacked_adamw.guarded_update. The new
parameters and optimizer state are the graph's outputs and are swapped in (`.data`, the state
dict's entries), not copied: copies would be a second graph every step."""
import torch
from torch.func import functional_call, grad_and_value

from .config import ConfigError
from .loop import micro_batch, with_targets
from .optim import set_lr
from .stacked_adamw import StackedAdamW, guarded_update


class DynamoStep:
    """loop.train_step's arguments and metrics, as one graph per step. Built at the first call:
    which parameters the step updates (those the loss reaches, as AdamW skips the others) is
    read from one traced backward, never run."""

    def __init__(self, job, runtime):
        if job.ema is not None or not isinstance(job.optimizer, StackedAdamW):
            raise ConfigError("runtime.dynamo_step runs AdamW (optim.name=adamw) without train.ema; "
                              "set runtime.dynamo_step=false")
        self.runtime, self.compiled, self.step = runtime, None, (0, 0)

    def __call__(self, model, teacher, optimizer, batch, lr, step, *, runtime, settings, ema=None):
        set_lr(optimizer, lr, batch["images"].device)
        if self.compiled is None:
            self._build(model, teacher, optimizer, batch, settings)
        self.step = (settings.seed, step)
        # the weights as plain tensors on their present buffers: kept below, see `retired`
        stacks = [([p.detach() for p in params], *state) for params, *state in
                  (self.optimizer.targets(params) for _, params in self.stacks)]
        # replaced by the graph's outputs below: their buffers may hold those outputs (as the
        # traced step's do), not a second copy of the weights and state
        self.runtime.donate([t for tensors in stacks for ts in tensors for t in ts])
        # replicated, as the graph's replay expects its inputs: a new lr tensor is not marked yet
        lrs = self.runtime.replicate([group["lr"] for group, _ in self.stacks])
        with torch.no_grad():  # torch.func.grad makes its own gradients; outside it, none are recorded
            metrics, news = self.compiled(stacks, self.fixed, batch, lrs)
        for (_, params), new in zip(self.stacks, news):
            for p, value, count, exp_avg, exp_avg_sq in zip(params, *new):
                p.data = value
                self.optimizer.state[p].update(step=count, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        # The donated buffers are let go of only after the next step is handed over: letting go of
        # one waits for the graph that uses it, and the host would no longer run a step ahead.
        self.retired = stacks
        return metrics

    def _build(self, model, teacher, optimizer, batch, settings):
        self.model, self.teacher, self.optimizer, self.settings = model, teacher, optimizer, settings
        reached = self._reached_by_the_loss(batch)
        self.stacks = optimizer.stacks(lambda p: p in reached)
        for _, params in self.stacks:
            optimizer.stacked_state(params)  # state made for any parameter that has none yet
        names = {p: n for n, p in model.named_parameters()}
        self.names = [[names[p] for p in params] for _, params in self.stacks]
        self.groups = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group, _ in self.stacks]
        updated = {n for names in self.names for n in names}  # the rest the step reads and does not write:
        self.fixed = {n: t for n, t in (*model.named_parameters(), *model.named_buffers()) if n not in updated}
        self.compiled = self.runtime.compile_replayed(self._step, lambda: self.runtime.seed_step_noise(*self.step))

    def _reached_by_the_loss(self, batch) -> set:
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses = self.model(with_targets(batch, self.teacher), self._noise())
        grads = torch.autograd.grad(losses["loss"], params, allow_unused=True)
        return {p for p, g in zip(params, grads) if g is not None}

    def _noise(self):
        shape = self.model.noise_shape
        return None if shape is None else self.runtime.draw_noise(shape, self.settings.global_batch)

    def _step(self, stacks, fixed, batch, lrs):
        """The graph: (metrics, per stack the new (params, steps, exp_avg, exp_avg_sq) one tensor
        each) from per stack the old ones, the other tensors, the batch and each stack's lr."""
        accum, noise = self.settings.accum_steps, self._noise()
        trainable = {n: t for names, tensors in zip(self.names, stacks) for n, t in zip(names, tensors[0])}

        def loss(weights, micro, micro_noise):
            with self.runtime.autocast():
                losses = functional_call(self.model, {**fixed, **weights}, (with_targets(micro, self.teacher), micro_noise))
            return losses["loss"] / accum, losses

        grads, totals = None, {}
        for i in range(accum):
            micro = {k: micro_batch(v, i, accum) for k, v in batch.items()}
            g, (_, losses) = grad_and_value(loss, has_aux=True)(
                trainable, micro, None if noise is None else micro_batch(noise, i, accum))
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / accum
        loss_finite = self.runtime.all_processes_in_step(torch.isfinite(totals["loss"]))
        stacked_grads = [torch.stack([grads[n] for n in names]) for names in self.names]
        olds = [tuple(torch.stack(ts) for ts in tensors) for tensors in stacks]
        groups = [{**group, "lr": lr} for group, lr in zip(self.groups, lrs)]
        grad_norm, applied, kept = guarded_update(groups, stacked_grads, olds, self.settings.clip_grad, loss_finite)
        metrics = {**totals, "grad_norm": grad_norm, "applied": applied}
        if "skipped" in batch:
            metrics["skipped_images"] = batch["skipped"].sum()
        # clones: outputs that were views of one stacked output would be re-made outside the graph, op by op
        return metrics, [[[t.clone() for t in values.unbind(0)] for values in stack] for stack in kept]
