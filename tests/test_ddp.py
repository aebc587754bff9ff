"""DistributedDataParallel over gloo with 2 real processes (torchrun) against 1 process."""
import subprocess
import sys

import pytest

from conftest import REPO, read_metrics, run_here, toy_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves it out

STEPS = 5


@pytest.mark.parametrize("accum", [1, 2])
def test_two_process_ddp_matches_one_process(embedded_root, tmp_path, accum):
    """Each process loads half the global batch; with accum 2 the first micro-batch runs under
    no_sync. Losses and gradient norms must equal the single process's."""
    args = toy_overrides(embedded_root, tmp_path / "one", **{"train.stop_at_step": STEPS})
    single = run_here(["pretrain", *args])
    assert single.returncode == 0, single.stderr[-3000:]

    args = toy_overrides(embedded_root, tmp_path / "two", **{"train.stop_at_step": STEPS,
                                                              "train.accum_steps": accum})
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "xla_trainer", "pretrain", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # host 0 alone writes
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (a["step"], key)
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-3)
