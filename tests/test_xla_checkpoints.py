"""Checkpoints under SPMD on a 4-device CPU mesh: restored onto another mesh and onto the eager CPU
backend, and back, tensor for tensor; a crash during a save; gs://. The runs of this file share a
few XLA processes (one start-up each): every save, then every restore; every run's first part,
then every second part."""
import json
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import fsspec
import pytest

import xla_runs
from conftest import REPO, read_metrics, toy_overrides
from gcs_fixtures import new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.xla]  # make test-fast leaves slow out

XLA4 = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
PLACEMENTS = {"data-parallel-to-fsdp": ("[-1,1]", "[2,2]"), "fsdp-to-eager-cpu": ("[2,2]", "cpu"),
              "eager-cpu-to-fsdp": ("cpu", "[1,4]")}


@pytest.fixture(scope="module")
def restored(embedded_root, tmp_path_factory):
    """case -> the report of the restore (tests/dcp_roundtrip.py): the saves in one process, then
    the restores in another."""
    tmp = tmp_path_factory.mktemp("dcp")

    def every(mode: str, side: int) -> subprocess.CompletedProcess:
        jobs = [f"{placements[side]}={tmp / case}" for case, placements in PLACEMENTS.items()]
        done = subprocess.run([sys.executable, str(REPO / "tests" / "dcp_roundtrip.py"), mode, str(embedded_root), *jobs],
                              cwd=REPO, env={**os.environ, **XLA4}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    every("save", 0)
    reports = [json.loads(line) for line in every("restore", 1).stdout.splitlines() if line.startswith("{")]
    return {case: next(r for r in reports if r["out"] == str(tmp / case)) for case in PLACEMENTS}


@pytest.mark.parametrize("case", PLACEMENTS)
def test_a_checkpoint_restores_on_another_placement_with_identical_tensors(restored, case):
    report = restored[case]
    assert report["identical"] and report["tensors"] > 100
    assert report["extra"] == {"step": 7, "note": [1, [2, 3]], "config": {"a": [1, 2], "b": None}}


def pretrain(data_root, out, stop: int, *extra: str) -> list[str]:
    return ["pretrain", *toy_overrides(data_root, out, **{"runtime.backend": "xla", "train.ckpt_every": 1,
                                                         "train.stop_at_step": stop}), *extra]


def leave_a_half_save(out):
    """What a save killed mid-way leaves: shard files of step 4 without commit.json, which is
    written last."""
    partial = out / "checkpoints" / "4"
    shutil.copytree(out / "checkpoints" / "3", partial)
    (partial / "commit.json").unlink()
    for shard in partial.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])


class Launches(NamedTuple):
    out: object  # the output_dir
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess | None
    kept: list[str] | None  # the checkpoints after the first launch (a local output_dir)


@pytest.fixture(scope="module")
def runs(embedded_root, gcs_server, tmp_path_factory):
    """The toy runs on 4 XLA devices, name -> Launches: the first launches run in one process, then
    "crash" gets a half save, then the second launches run in another process."""
    tmp = tmp_path_factory.mktemp("xla_runs")
    out = {"uninterrupted": tmp / "full", "other mesh": tmp / "mesh", "crash": tmp / "crash",
           "gs": f"{new_bucket(gcs_server)}/xla-run"}

    def launch(phase: dict, spec) -> dict:
        done = xla_runs.run(4, list(phase.values()), spec)
        for name, result in zip(phase, done):
            assert result.returncode == 0, (name, result.stderr[-3000:])
        return dict(zip(phase, done))

    first = launch({"uninterrupted": pretrain(embedded_root, out["uninterrupted"], 6),
                    "other mesh": pretrain(embedded_root, out["other mesh"], 3),
                    "crash": pretrain(embedded_root, out["crash"], 3),
                    "gs": pretrain(embedded_root, out["gs"], 2)}, tmp / "first.json")
    kept = {name: sorted(p.name for p in (out[name] / "checkpoints").iterdir()) for name in first if name != "gs"}
    leave_a_half_save(out["crash"])
    second = launch({"other mesh": pretrain(embedded_root, out["other mesh"], 6, "runtime.mesh=[2,2]"),
                     "crash": pretrain(embedded_root, out["crash"], 6),
                     "gs": pretrain(embedded_root, out["gs"], 4)}, tmp / "second.json")
    return {name: Launches(out[name], first[name], second.get(name), kept.get(name)) for name in out}


def test_resume_on_another_mesh_continues_the_run(runs):
    full, (out, _, second, kept) = runs["uninterrupted"].out, runs["other mesh"]
    assert kept == ["2", "3"]  # keep_checkpoints=2
    assert f"resumed from {out}/checkpoints/3 at step 3" in second.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(read_metrics(full), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3, abs=2e-3), a["step"]


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(runs):
    """The next start after a half save resumes from step 3, as if uninterrupted."""
    full, (out, _, second, _) = runs["uninterrupted"].out, runs["crash"]
    assert f"resumed from {out}/checkpoints/3 at step 3" in second.stderr
    for a, b in zip(read_metrics(full), read_metrics(out), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), a["step"]


def test_distributed_checkpoints_on_gs(runs):
    out, _, second, _ = runs["gs"]
    assert f"resumed from {out}/checkpoints/2 at step 2" in second.stderr
    rows = fsspec.filesystem("gs").cat(f"{out}/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
