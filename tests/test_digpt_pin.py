"""D-iGPT's losses for the demo config and seed 0, pinned: the values the trainer gave before
objectives, backbones and teachers became plug-ins (commit 55168e9), on the CPU backend, 4 steps."""
import pytest

from conftest import read_metrics
from xla_trainer.config import load_config
from xla_trainer.pretrain import pretrain

# (loss, loss_ar, loss_kd, grad_norm) of steps 1-4
PINNED = [
    (3.990100860595703, 2.0341603755950928, 1.9559403657913208, 3.959953784942627),
    (3.9523634910583496, 2.023491382598877, 1.9288722276687622, 3.8128786087036133),
    (3.8582515716552734, 1.9876514673233032, 1.8706002235412598, 3.2330944538116455),
    (3.7398123741149902, 1.9020625352859497, 1.837749719619751, 2.742715358734131),
]


def test_demo_losses_are_unchanged(embedded_root, tmp_path):
    cfg = load_config(None, [f"data.root={embedded_root}", f"train.output_dir={tmp_path}",
                             "runtime.backend=cpu", "data.num_workers=0", "train.stop_at_step=4",
                             "train.log_every=1"])
    pretrain(cfg)
    rows = read_metrics(tmp_path)
    found = [(r["loss"], r["loss_ar"], r["loss_kd"], r["grad_norm"]) for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for step, (got, want) in enumerate(zip(found, PINNED), start=1):
        assert got == pytest.approx(want, rel=1e-4), step
