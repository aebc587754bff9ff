"""Checkpoints under SPMD on a 4-device CPU mesh: restored onto another mesh and onto the eager CPU
backend, and back, tensor for tensor; a crash during a save; gs://."""
import json
import os
import shutil
import subprocess
import sys

import fsspec
import pytest

from conftest import REPO, read_metrics, run_cli, toy_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves it out

XLA4 = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}


def xla_pretrain(data_root, out, *extra):
    args = toy_overrides(data_root, out, **{"runtime.backend": "xla", "train.ckpt_every": 1})
    result = run_cli(["pretrain", *args, *extra], env=XLA4)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("saved_on,restored_on", [("[-1,1]", "[2,2]"), ("[2,2]", "cpu"), ("cpu", "[1,4]")],
                         ids=["data-parallel-to-fsdp", "fsdp-to-eager-cpu", "eager-cpu-to-fsdp"])
def test_a_checkpoint_restores_on_another_placement_with_identical_tensors(embedded_root, tmp_path,
                                                                          saved_on, restored_on):
    def helper(placement, mode):
        return subprocess.run([sys.executable, str(REPO / "tests" / "dcp_roundtrip.py"), placement, mode,
                               str(tmp_path), str(embedded_root)],
                              cwd=REPO, env={**os.environ, **XLA4}, capture_output=True, text=True)

    saved = helper(saved_on, "save")
    assert saved.returncode == 0, saved.stderr[-3000:]
    restored = helper(restored_on, "restore")
    assert restored.returncode == 0, restored.stderr[-3000:]
    report = json.loads(restored.stdout.strip().splitlines()[-1])
    assert report["identical"] and report["tensors"] > 100
    assert report["extra"] == {"step": 7, "note": [1, [2, 3]], "config": {"a": [1, 2], "b": None}}


@pytest.fixture(scope="module")
def uninterrupted(embedded_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("xla_full")
    xla_pretrain(embedded_root, out, "train.stop_at_step=6")
    return read_metrics(out)


def test_resume_on_another_mesh_continues_the_run(embedded_root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    xla_pretrain(embedded_root, out, "train.stop_at_step=3")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]  # keep_checkpoints=2
    second = xla_pretrain(embedded_root, out, "train.stop_at_step=6", "runtime.mesh=[2,2]")
    assert f"resumed from {out}/checkpoints/3 at step 3" in second.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(uninterrupted, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3, abs=2e-3), a["step"]


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(embedded_root, tmp_path, uninterrupted):
    """The state a save killed mid-way leaves: shard files of step 4 without commit.json, which
    is written last. The next start resumes from step 3 and removes the half save."""
    out = tmp_path / "run"
    xla_pretrain(embedded_root, out, "train.stop_at_step=3")
    partial = out / "checkpoints" / "4"
    shutil.copytree(out / "checkpoints" / "3", partial)
    (partial / "commit.json").unlink()
    for shard in partial.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    second = xla_pretrain(embedded_root, out, "train.stop_at_step=6")
    assert f"resumed from {out}/checkpoints/3 at step 3" in second.stderr
    rows = read_metrics(out)
    for a, b in zip(uninterrupted, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), a["step"]


def test_distributed_checkpoints_on_gs(embedded_root, gcs_bucket):
    out = f"{gcs_bucket}/xla-run"
    xla_pretrain(embedded_root, out, "train.stop_at_step=2")
    second = xla_pretrain(embedded_root, out, "train.stop_at_step=4")
    assert f"resumed from {out}/checkpoints/2 at step 2" in second.stderr
    rows = fsspec.filesystem("gs").cat(f"{out}/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
