"""The real XLA SPMD path on CPU: PJRT_DEVICE=CPU with 1 and 4 devices in separate processes."""
import re

import pytest

from conftest import read_metrics, run_cli, toy_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves it out

STEPS = 6


def xla_run(data_root, output_dir, devices: int, *extra):
    """The metrics rows of a short run, and the parameter MiB per device it reports."""
    args = ["pretrain", *toy_overrides(data_root, output_dir, **{"runtime.backend": "xla"}),
            f"train.stop_at_step={STEPS}", *extra]
    result = run_cli(args, env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)})
    assert result.returncode == 0, result.stderr[-3000:]
    mib = float(re.search(r"parameters:\s+([\d.]+) MiB per device", result.stdout).group(1))
    return read_metrics(output_dir), mib


@pytest.fixture(scope="module")
def runs(embedded_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("xla")
    runs = {n: xla_run(embedded_root, out / f"dev{n}", n) for n in (1, 4)}
    runs["4, accum 2"] = xla_run(embedded_root, out / "accum", 4, "train.accum_steps=2")
    runs["4, fsdp"] = xla_run(embedded_root, out / "fsdp", 4, "runtime.mesh=[1,-1]")
    runs["2x2"] = xla_run(embedded_root, out / "2x2", 4, "runtime.mesh=[2,2]")
    return {name: rows for name, (rows, _) in runs.items()}, {name: mib for name, (_, mib) in runs.items()}


@pytest.mark.parametrize("other", [4, "4, accum 2", "4, fsdp", "2x2"])
def test_four_devices_match_one_device(runs, other):
    runs, _ = runs
    """Same global batch, same samples, same segment orders: the same losses on a 4-device mesh,
    also when each step is two accumulated micro-batches, with FSDP (parameters and optimizer state
    sharded over 4 devices) and on a 2 (data) x 2 (fsdp) mesh."""
    one, four = runs[1], runs[other]
    assert [r["step"] for r in one] == [r["step"] for r in four] == list(range(1, STEPS + 1))
    for a, b in zip(one, four):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (a["step"], key)
    # and the run moves: identical losses from a frozen model would also "match"
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-3)


def test_the_step_compiles_once(runs):
    """The optimizer state is made before the first step, with the shardings the step gives it:
    step 1 is already the graph of every later step (on every mesh, FSDP included)."""
    for n, rows in runs[0].items():
        compiles = [r["compiles"] for r in rows]
        assert 0 < compiles[0] == compiles[-1], (n, compiles)


def test_batch_not_divisible_by_mesh_fails_before_compiling(embedded_root, tmp_path):
    args = ["pretrain", *toy_overrides(embedded_root, tmp_path, **{"runtime.backend": "xla"}),
            "train.global_batch=6"]
    result = run_cli(args, env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    assert result.returncode == 2
    assert "train.global_batch 6 is not divisible by data-parallel size 4" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fsdp_shrinks_parameter_bytes_per_device(runs):
    _, mib = runs
    assert mib["2x2"] < 0.6 * mib[4] and mib["4, fsdp"] < 0.6 * mib["2x2"]
    assert mib[4] == mib[1]  # data-parallel: every device holds every parameter


def test_mesh_that_does_not_fit_the_devices(embedded_root, tmp_path):
    result = run_cli(["pretrain", *toy_overrides(embedded_root, tmp_path, **{"runtime.backend": "xla",
                                                                              "runtime.mesh": "[3,-1]"})],
                     env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    assert result.returncode == 2
    assert "runtime.mesh [3, -1] does not fit 4 devices" in result.stderr
