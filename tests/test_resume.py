"""An interrupted run resumed from its checkpoint reproduces the uninterrupted run."""
import pytest

from conftest import read_metrics, run_cli, toy_overrides
from xla_trainer.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow  # make test-fast leaves it out

STEPS = 6


def test_resumed_run_matches_uninterrupted(embedded_root, tmp_path):
    full = run_cli(["pretrain", *toy_overrides(embedded_root, tmp_path / "full",
                                                **{"train.stop_at_step": STEPS})])
    assert full.returncode == 0, full.stderr[-3000:]

    resumed_dir = tmp_path / "resumed"
    common = toy_overrides(embedded_root, resumed_dir, **{"train.ckpt_every": 2})
    first = run_cli(["pretrain", *common, "train.stop_at_step=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_checkpoint(list_checkpoints(str(resumed_dir))[-1])
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "batch_in_epoch": 3}
    # as if the run had logged two more steps and died before checkpointing them
    with open(resumed_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 99.0}\n{"step": 5, "loss": 99.0}\n')
    second = run_cli(["pretrain", *common, f"train.stop_at_step={STEPS}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr

    a, b = read_metrics(tmp_path / "full"), read_metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    # keep_checkpoints=2: only the newest two remain
    assert [p.rsplit("-", 1)[1] for p in list_checkpoints(str(resumed_dir))] == ["00000004.pt", "00000006.pt"]

    # the XLA backend cannot resume these files: it refuses, instead of starting at step 0 and
    # dropping the run's metrics rows
    rows = (resumed_dir / "metrics.jsonl").read_text()
    other = run_cli(["pretrain", *common, "runtime.backend=xla"], env={"PJRT_DEVICE": "CPU"})
    assert other.returncode == 2, other.stderr[-3000:]
    assert (f"train.output_dir '{resumed_dir}' holds checkpoints of the cpu/cuda backends (checkpoint-00000006.pt)"
            in other.stderr and "Traceback" not in other.stderr)
    assert (resumed_dir / "metrics.jsonl").read_text() == rows
