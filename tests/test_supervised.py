"""`xla-trainer train`: a classifier from scratch on any backbone, through the shared loop."""
import pytest

from conftest import read_metrics
from xla_trainer.cli import main

pytestmark = pytest.mark.slow  # make test-fast leaves it out

CHANCE, MARGIN = 10.0, 35.0  # top-1 points on the 10 digits; measured 60.3 on a 2-core CPU VM


def test_the_demo_config_trains_a_vit_from_scratch_well_above_chance(digits_root, tmp_path, capsys):
    assert main(["train", f"data.root={digits_root}", f"train.output_dir={tmp_path}", "runtime.backend=cpu",
                 "data.num_workers=0"]) == 0
    line = capsys.readouterr().out
    top1 = float(line.split("train: top-1 ")[1].split("%")[0])
    assert top1 > CHANCE + MARGIN, line
    val = [r for r in read_metrics(tmp_path) if r.get("group") == "val"]
    assert [r["epoch"] for r in val] == list(range(1, 11)) and val[-1]["val_loss"] < 0.7 * val[0]["val_loss"]


def test_train_refuses_initial_weights(digits_root, tmp_path, capsys):
    assert main(["train", f"data.root={digits_root}", f"train.output_dir={tmp_path}", "train.init=runs/demo"]) == 2
    assert "`train` trains a classifier from scratch, but train.init is 'runs/demo'; use `finetune`" in \
        capsys.readouterr().err
