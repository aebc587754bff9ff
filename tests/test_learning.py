"""The demo config, unchanged, learns on the embedded real images through the XLA path."""
from statistics import mean

from conftest import read_metrics, run_cli


def test_demo_config_loss_falls(embedded_root, tmp_path):
    result = run_cli(["pretrain", f"data.root={embedded_root}", f"train.output_dir={tmp_path}"],
                     env={"PJRT_DEVICE": "CPU"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint:  {tmp_path}/checkpoints/300" in result.stdout  # distributed checkpoint (XLA)
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows]
    assert len(rows) == 30 and rows[-1]["step"] == 300
    assert losses[-1] < 0.45 * losses[0]
    # still improving after the first quick drop, not just leaving the initialisation
    assert mean(losses[-5:]) < mean(losses[3:8]) - 0.1
    assert rows[-1]["compiles"] == rows[2]["compiles"]  # no recompilation after warm-up
