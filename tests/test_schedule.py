"""optim.schedule_unit: the per-epoch schedule equals timm's CosineLRScheduler stepped per epoch
(t_in_epochs=True, DeiT / Adventurer), and the per-step schedule is unchanged."""
import math
from types import SimpleNamespace

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from xla_trainer.config import ConfigError, load_config
from xla_trainer.loop import Schedule, make_schedule


def _cfg(unit, epochs, warmup_epochs, lr, warmup_from, min_lr, global_batch=4):
    optim = SimpleNamespace(base_lr=None, lr=lr, warmup_epochs=warmup_epochs, warmup_from=warmup_from,
                            min_lr=min_lr, schedule_unit=unit)
    return SimpleNamespace(optim=optim, train=SimpleNamespace(epochs=epochs, global_batch=global_batch))


def _timm_lrs(epochs, warmup_epochs, peak, warmup_lr_init, min_lr):
    """The lr timm's scheduler sets for each epoch t (step(t) sets the value of epoch t)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
                              warmup_lr_init=warmup_lr_init, t_in_epochs=True)
    out = []
    for t in range(epochs):
        sched.step(t)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("epochs, warmup, peak, warmup_from, min_lr", [
    (300, 5, 1e-3, 1e-3, 1e-5),   # Adventurer stage 1 / 2: 5 warmup epochs from 1e-6, cosine to 1e-5
    (20, 5, 1e-5, 0.1, 1e-5),     # stage 3: from 1e-6 to 1e-5, then flat
    (12, 0, 2e-3, 0.0, 0.0),      # no warmup
    (10, 3, 5e-3, 0.0, 1e-6)])
def test_epoch_unit_equals_timm_per_epoch(epochs, warmup, peak, warmup_from, min_lr):
    steps_per_epoch = 7
    schedule = make_schedule(_cfg("epoch", epochs, warmup, peak, warmup_from, min_lr), steps_per_epoch * 4)
    assert schedule.steps_per_epoch == steps_per_epoch
    expected = _timm_lrs(epochs, warmup, peak, warmup_from * peak, min_lr)
    for epoch, lr in enumerate(expected):
        first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1
        assert schedule.lr(first) == pytest.approx(lr, rel=1e-12, abs=1e-15), epoch
        assert schedule.lr(last) == schedule.lr(first)  # constant within the epoch
    assert expected[0] == pytest.approx(warmup_from * peak if warmup else peak)


def test_step_unit_is_unchanged():
    """The per-iteration schedule (default) as it was: linear warmup reaching the peak at step
    warmup_steps - 1, then a half-cycle cosine from the peak to min_lr over the remaining steps."""
    cfg = _cfg("step", 10, 2.5, 1e-3, 0.1, 1e-6)
    schedule = make_schedule(cfg, 4 * 13)
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (13, 130, 32)
    peak, start, w, total = 1e-3, 1e-4, 32, 130
    for step in range(total + 2):
        if step < w:
            want = start + (peak - start) * (step + 1) / w
        else:
            progress = min((step - w) / (total - w), 1.0)
            want = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
        assert schedule.lr(step) == want, step  # exactly
    # the default unit, and a Schedule built without one, are per step
    assert Schedule(13, 130, 32, peak, 1e-6, 0.1).lr(40) == schedule.lr(40)


def test_adventurer_recipes_step_per_epoch_and_others_per_step():
    for name in ("stage1_b16_128", "stage2_b16_224", "stage3_b16_224_finetune"):
        cfg = load_config(f"configs/adventurer/{name}.yaml")
        assert cfg.optim.schedule_unit == "epoch", name
        schedule = make_schedule(cfg, 1_281_167)
        n = schedule.steps_per_epoch
        assert schedule.lr(0) == pytest.approx(1e-6) and schedule.lr(n - 1) == schedule.lr(0)
    assert load_config("configs/xtra/vit_b16_in1k.yaml").optim.schedule_unit == "step"


def test_schedule_unit_is_a_checked_choice():
    with pytest.raises(ConfigError, match="schedule_unit"):
        load_config("configs/adventurer/stage1_b16_128.yaml", ["optim.schedule_unit=iteration"])
    with pytest.raises(ConfigError, match="schedule_unit"):
        load_config("configs/xtra/vit_b16_in1k.yaml", ["optim.schedule_unit=iteration"])
    assert load_config("configs/xtra/vit_b16_in1k.yaml", ["optim.schedule_unit=epoch"]).optim.schedule_unit == "epoch"
