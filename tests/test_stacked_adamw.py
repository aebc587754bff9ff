"""StackedAdamW (the XLA runtime's AdamW): the same steps, state and guard as torch's AdamW under
optim.clip_and_step, in-process on the CPU; on XLA the losses of whole runs are compared in
test_xla_spmd.py and the traced step's size in test_cli.py."""
import copy

import pytest
import torch

from xla_trainer.optim import build_optimizer, clip_and_step, set_lr
from xla_trainer.stacked_adamw import StackedAdamW


class Blocks(torch.nn.Module):
    """Three blocks of one shape (stacked together), a differently shaped head, biases and norms
    (the no-decay group) and a parameter that gets no gradient."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
                                            for _ in range(3)])
        self.head = torch.nn.Linear(6, 2)
        self.unused = torch.nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.head(self.blocks(x))


def make(stacked: bool):
    torch.manual_seed(0)
    model = Blocks()
    options = {"stacked": True} if stacked else {}
    return model, build_optimizer(model, 1e-2, 0.05, (0.9, 0.95), **options)


def train(model, optimizer, inputs, clip):
    out = []
    for i, x in enumerate(inputs):
        set_lr(optimizer, 1e-2 * (i + 1), x.device)
        loss = model(x).square().mean()
        loss.backward()
        grad_norm, applied = clip_and_step(model, optimizer, clip, torch.isfinite(loss))
        out.append((loss.item(), grad_norm.item(), bool(applied)))
    return out


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_steps_and_the_state_are_torchs(clip):
    torch.manual_seed(1)
    inputs = [torch.randn(4, 6) for _ in range(5)]
    inputs[2] = inputs[2] * float("nan")  # a skipped step in the middle
    (model, ours), (reference, torchs) = make(True), make(False)
    assert isinstance(ours, StackedAdamW) and type(torchs) is torch.optim.AdamW
    got, want = train(model, ours, inputs, clip), train(reference, torchs, inputs, clip)
    assert [a for *_, a in got] == [True, True, False, True, True]
    for (loss, norm, _), (ref_loss, ref_norm, _) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=1e-5, nan_ok=True)
        assert norm == pytest.approx(ref_norm, rel=1e-5, nan_ok=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    ours_sd, torchs_sd = ours.state_dict(), torchs.state_dict()
    assert ours_sd["state"].keys() == torchs_sd["state"].keys()  # the unused parameter has none
    for i, state in torchs_sd["state"].items():
        assert ours_sd["state"][i].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(ours_sd["state"][i][k], v, rtol=1e-5, atol=1e-8)
    assert {s["step"].item() for s in ours_sd["state"].values()} == {4}  # the skipped step did not count
    assert all(p.grad is None for p in model.parameters())


def test_a_state_dict_moves_between_the_two():
    torch.manual_seed(1)
    inputs = [torch.randn(4, 6) for _ in range(4)]
    (model, ours), (reference, torchs) = make(True), make(False)
    train(reference, torchs, inputs[:2], None)
    model.load_state_dict(reference.state_dict())
    ours.load_state_dict(copy.deepcopy(torchs.state_dict()))
    got, want = train(model, ours, inputs[2:], None), train(reference, torchs, inputs[2:], None)
    assert [a for *_, a in got] == [a for *_, a in want] == [True, True]
    assert [v for step in got for v in step[:2]] == pytest.approx([v for step in want for v in step[:2]], rel=1e-5)


def test_an_update_that_overflows_is_not_applied():
    """A finite loss and gradient norm, an update that is not (an lr past float32's range)."""
    model, optimizer = make(True)
    before = copy.deepcopy(model.state_dict())
    set_lr(optimizer, 1e39, torch.device("cpu"))
    loss = model(torch.randn(4, 6)).square().mean()
    loss.backward()
    grad_norm, applied = clip_and_step(model, optimizer, None, torch.isfinite(loss))
    assert torch.isfinite(grad_norm) and not applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.count_nonzero(v) == 0 for s in optimizer.state.values() for v in s.values())
