"""The guard of the update (optim.clip_and_step) and the loop's policy for the steps it skipped
(loop.NonFiniteSteps), in-process on the CPU; the real processes on every backend are in
test_faults.py."""
import pytest
import torch
from timm.utils import ModelEmaV3

from xla_trainer.evaluate import update_ema
from xla_trainer.loop import NonFiniteSteps, TrainingDiverged
from xla_trainer.optim import clip_and_step


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)


def step(model, optimizer, x, clip=None):
    loss = model(x).square().mean()
    loss.backward()
    return loss, *clip_and_step(model, optimizer, clip, torch.isfinite(loss))


def snapshot(model, optimizer):
    state = [v.clone() for s in optimizer.state.values() for v in s.values()]
    return [p.detach().clone() for p in model.parameters()] + state


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_nonfinite_step_changes_nothing(clip):
    model, optimizer = model_and_optimizer()
    x = torch.randn(8, 4)
    _, _, applied = step(model, optimizer, x, clip)
    assert applied  # and the step moved the weights
    before = snapshot(model, optimizer)
    loss, grad_norm, applied = step(model, optimizer, x * float("nan"), clip)
    assert not applied and not torch.isfinite(grad_norm)
    after = snapshot(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # parameters, moments and step count
    assert all(p.grad is None for p in model.parameters())
    _, _, applied = step(model, optimizer, x, clip)
    assert applied and not torch.equal(before[0], model[0].weight)


def test_an_update_that_overflows_is_not_applied():
    """Finite loss and gradients, but an update that takes weights to inf."""
    model, _ = model_and_optimizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=3e38)
    before = [p.detach().clone() for p in model.parameters()]
    loss = (model(torch.randn(8, 4)) * 1000).sum()
    loss.backward()
    grad_norm, applied = clip_and_step(model, optimizer, None, torch.isfinite(loss))
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and not applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_the_first_skipped_step_created_is_fresh():
    model, optimizer = model_and_optimizer()
    _, _, applied = step(model, optimizer, torch.full((8, 4), float("nan")))
    assert not applied and optimizer.state  # eager AdamW made its state in that step
    assert all(torch.count_nonzero(v) == 0 for s in optimizer.state.values() for v in s.values())


def test_a_skipped_step_does_not_move_the_average():
    model, _ = model_and_optimizer()
    ema = ModelEmaV3(model, decay=0.5)
    before = [t.clone() for t in ema.module.state_dict().values()]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    update_ema(ema, model, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.state_dict().values()))
    update_ema(ema, model, torch.tensor(True))
    assert not torch.equal(before[0], ema.module.state_dict()["0.weight"])


def rows(*applied, start=1):
    return [(start + i, {"applied": float(a), "loss": 1.0 if a else float("nan"), "grad_norm": 1.0})
            for i, a in enumerate(applied)]


def test_stop_names_the_first_skipped_step_and_the_checkpoint():
    with pytest.raises(TrainingDiverged, match=r"step 3 was not applied: loss nan.*newest checkpoint "
                                               r"\(every tensor finite\) is ckpt/2"):
        NonFiniteSteps("stop", 5).check(rows(1, 1, 0, 1), "ckpt/2")


def test_skip_counts_each_step_once_and_stops_after_too_many_in_a_row():
    policy = NonFiniteSteps("skip", 3, skipped_before=4)
    checked = rows(1, 0, 0, 1)
    policy.check(checked, None)
    policy.check(checked + rows(0, 0, start=5), None)  # a checkpoint step's rows again at the log step
    assert (policy.total, policy.in_a_row) == (8, 2)
    with pytest.raises(TrainingDiverged, match=r"step 7 was not applied.*; 3 non-finite steps in a row \(train.max_skipped_steps 3\)"):
        policy.check(rows(0, start=7), "ckpt/4")
