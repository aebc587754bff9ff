"""An interrupted run resumed from its checkpoint reproduces the uninterrupted run, on the same
backend exactly and across backends (XLA SPMD on 4 CPU devices, data-parallel or FSDPv2; the eager
CPU backend; DDP and FSDP2 over 2 gloo processes, HSDP over 4) along the same loss curve: one
checkpoint format everywhere."""
import importlib.util
import itertools
import subprocess
import sys

import pytest

from conftest import REPO, read_metrics, run_cli, run_here, toy_overrides
from xla_trainer.checkpoint import newest_checkpoint, read_checkpoint

pytestmark = pytest.mark.slow  # make test-fast leaves it out

STEPS = 6
XLA4 = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}


def assert_same_curve(reference, rows, tol):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for x, y in zip(reference, rows):
        for key in ("loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=tol, abs=tol), (x["step"], key)


def test_resumed_run_matches_uninterrupted(embedded_root, tmp_path):
    full = run_here(["pretrain", *toy_overrides(embedded_root, tmp_path / "full",
                                                **{"train.stop_at_step": STEPS})])
    assert full.returncode == 0, full.stderr[-3000:]

    resumed_dir = tmp_path / "resumed"
    common = toy_overrides(embedded_root, resumed_dir, **{"train.ckpt_every": 2})
    first = run_here(["pretrain", *common, "train.stop_at_step=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    extra = read_checkpoint(newest_checkpoint(str(resumed_dir)))["extra"]
    assert extra["step"] == 3 and extra["data_position"] == {"epoch": 0, "batch_in_epoch": 3}
    # as if the run had logged two more steps and died before checkpointing them
    with open(resumed_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 99.0}\n{"step": 5, "loss": 99.0}\n')
    second = run_here(["pretrain", *common, f"train.stop_at_step={STEPS}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {resumed_dir}/checkpoints/3 at step 3" in second.stderr

    assert_same_curve(read_metrics(tmp_path / "full"), read_metrics(resumed_dir), 1e-5)
    # keep_checkpoints=2: only the newest two remain, each committed
    assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["4", "6"]
    assert (resumed_dir / "checkpoints" / "6" / "commit.json").exists()


# --- across backends ----------------------------------------------------------------------------
# keep=1: the toy loss then does not depend on the step noise, which each backend draws from its
# own generator; the curves agree to float rounding.


# backend -> (torchrun processes, 0 for one process without torchrun; runtime.mesh)
PLACEMENTS = {"cpu": (0, "[-1,1]"), "xla": (0, "[-1,1]"), "xla-dynamo": (0, "[-1,1]"), "xla-fsdp": (0, "[2,2]"),
              "ddp": (2, "[-1,1]"), "fsdp2": (2, "[1,2]"), "hsdp": (4, "[2,2]")}


def pretrain_on(backend: str, data_root, out, stop: int):
    processes, mesh = PLACEMENTS[backend]
    args = ["pretrain", *toy_overrides(data_root, out, **{"objective.keep": 1.0, "train.ckpt_every": 100,
                                                          "train.stop_at_step": stop, "runtime.mesh": mesh})]
    if backend.startswith("xla"):
        dynamo = "true" if backend == "xla-dynamo" else "false"
        result = run_cli([*args, "runtime.backend=xla", f"runtime.dynamo_step={dynamo}"], env=XLA4)
    elif processes:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={processes}", "-m", "xla_trainer", *args],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
    else:
        result = run_here(args)
    assert result.returncode == 0, (backend, result.stderr[-3000:])
    return result


# Every move between two of cpu, xla, ddp and fsdp2 once (xla: data-parallel, once with
# runtime.dynamo_step, or FSDPv2 [2,2] next to FSDP2; fsdp2: [1,2], or HSDP [2,2] on 4 processes
# once): 13 segments.
CHAIN = ("cpu", "xla", "cpu", "ddp", "xla-dynamo", "ddp", "cpu", "fsdp2", "xla-fsdp", "hsdp", "ddp", "fsdp2", "cpu")
# Without torch_xla (make test-current-torch) the same chain less its XLA segments, so that the
# moves between the eager backends stay tested on the current torch: 8 segments.
if importlib.util.find_spec("torch_xla") is None:
    CHAIN = tuple(backend for backend, _ in itertools.groupby(b for b in CHAIN if not b.startswith("xla")))


def test_a_run_moves_between_backends(embedded_root, tmp_path):
    """Every segment of two steps resumes the previous backend's checkpoint (each ordered pair of
    CHAIN's backends once) and continues its curve; the whole equals one uninterrupted CPU run."""
    pretrain_on("cpu", embedded_root, tmp_path / "full", 2 * len(CHAIN))
    out = tmp_path / "run"
    for i, backend in enumerate(CHAIN):
        result = pretrain_on(backend, embedded_root, out, 2 * (i + 1))
        if i:
            assert f"resumed from {out}/checkpoints/{2 * i} at step {2 * i}" in result.stderr, backend
    cpu_curve = read_metrics(tmp_path / "full")
    assert_same_curve(cpu_curve, read_metrics(out), 2e-3)
    assert cpu_curve[0]["loss"] > 1.5 * cpu_curve[-1]["loss"]  # a curve: resuming at step 0 would show
