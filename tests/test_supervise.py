"""tpu_scripts/supervise.sh (xla_trainer/supervise.py) keeps a spot job alive: the preemption
simulation. A fake gcloud (tests/fake_gcloud.py) stands for the cloud: its slice's one worker is this
machine, it reclaims the slice and makes the job hang at injected steps and refuses a create; the
scripts and the trainer (the real `xla-trainer pretrain`, toy objective, CPU) run as they are."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_here, toy_overrides
from fake_cloud import Cloud, supervise_cmd, write_exe
from xla_trainer import supervise
from xla_trainer.loop import forget_completion, record_completion

STEPS = 30  # the toy at global_batch 32: 15 steps an epoch, 2 epochs
RUN = {"train.global_batch": 32, "train.ckpt_every": 2}


def relaunched_once(state: Path) -> bool:
    try:
        status = json.loads((state / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return status["restarts"] == 1 and status["state"] == "running"


@pytest.mark.slow
def test_a_spot_run_survives_preemptions_a_stockout_a_hang_and_its_supervisors_kill(embedded_root, tmp_path):
    out = tmp_path / "bucket" / "run"  # outside the worker's disk, as a gs:// bucket is
    faults = [{"kind": "preempt", "at_step": 4}, {"kind": "stockout"}, {"kind": "hang", "at_step": 10},
              {"kind": "preempt", "at_step": 16}, {"kind": "preempt", "at_step": 22}]
    cloud = Cloud(tmp_path, faults, out / "metrics.jsonl")
    reference_log = open(tmp_path / "uninterrupted.log", "w")
    reference = subprocess.Popen([sys.executable, "-m", "xla_trainer", "pretrain",
                                  *toy_overrides(embedded_root, tmp_path / "uninterrupted", **RUN)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=reference_log)
    state = tmp_path / "supervisor"
    command = supervise_cmd(state, "pretrain", *toy_overrides(embedded_root, out, **RUN))
    try:
        first = subprocess.Popen(command, env=cloud.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not relaunched_once(state) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        twice = subprocess.run(command, env=cloud.env, capture_output=True, text=True, timeout=60)
        first.kill()  # safe to kill: the next one adopts the slice and the running job
        first.wait()
        second = subprocess.run(command, env=cloud.env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-5000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    finally:
        cloud.tear_down()
    assert twice.returncode == 2 and "another supervisor" in twice.stderr, twice.stderr  # safe to run twice
    assert "adopted night (ACTIVE) and its job pretrain" in second.stderr

    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))  # every step, each once
    for a, b in zip(read_metrics(tmp_path / "uninterrupted"), read_metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), a["step"]
    for run in (out, tmp_path / "uninterrupted"):
        assert json.loads((run / "done.json").read_text())["step"] == STEPS
    assert json.loads((cloud.dir / "faults.json").read_text()) == []  # every fault was injected
    assert [e.split()[0] for e in cloud.lines("events.log")] == ["preempt", "stockout", "hang", "preempt", "preempt"]
    status = json.loads((state / "status.json").read_text())
    # 3 preemptions + 1 hang; 1 stock-out (counted on across the supervisor's kill)
    assert (status["restarts"], status["failed_creates"]) == (4, 1)
    assert status["state"] == "finished, slice deleted" and status["last_progress"] == f"{STEPS}/{STEPS}"
    assert cloud.slice() is None and cloud.lines("calls.log")[-1].startswith("compute tpus queued-resources delete")
    log = (state / "supervise.log").read_text()
    assert log.count("hung on") == 1 and log.count("slice SUSPENDED") == 3, log


@pytest.mark.slow
def test_an_on_demand_vm_is_recreated_after_a_preemption_and_a_stockout(embedded_root, tmp_path):
    """Without --spot: a TPU VM (no queued resource) PREEMPTED at step 6, then one create refused
    for capacity: the supervisor backs off, recreates it, and the run ends with every step once."""
    out = tmp_path / "bucket" / "run"
    cloud = Cloud(tmp_path, [{"kind": "preempt", "at_step": 6}, {"kind": "stockout"}], out / "metrics.jsonl")
    state = tmp_path / "supervisor"
    command = supervise_cmd(state, "pretrain", *toy_overrides(embedded_root, out, **RUN, **{"train.epochs": 1}),
                            spot=False)
    try:
        p = subprocess.run(command, env=cloud.env, capture_output=True, text=True, timeout=600)
    finally:
        cloud.tear_down()
    assert p.returncode == 0, p.stderr[-5000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS // 2 + 1))
    assert json.loads((out / "done.json").read_text())["step"] == STEPS // 2
    status = json.loads((state / "status.json").read_text())
    assert (status["restarts"], status["failed_creates"]) == (1, 1)
    assert "slice PREEMPTED" in (state / "supervise.log").read_text()
    calls = cloud.lines("calls.log")
    assert cloud.slice() is None and calls[-1].startswith("compute tpus tpu-vm delete")
    assert not any("queued-resources" in c for c in calls)


@pytest.mark.slow
def test_a_config_error_is_not_relaunched(embedded_root, tmp_path):
    out = tmp_path / "bucket" / "run"
    cloud = Cloud(tmp_path, [], out / "metrics.jsonl")
    state = tmp_path / "supervisor"
    bad = toy_overrides(embedded_root, out, **{"train.global_batch": 100000})  # more than the dataset holds
    try:
        p = subprocess.run(supervise_cmd(state, "pretrain", *bad), env=cloud.env, capture_output=True, text=True, timeout=300)
        kept = cloud.slice()
    finally:
        cloud.tear_down()
    assert p.returncode == 2, p.stderr[-3000:]
    assert "not relaunched" in p.stderr and "fewer than train.global_batch" in p.stderr  # the worker's last lines
    assert "tpu_scripts/delete.sh --spot --name night" in p.stderr  # how to delete the kept slice
    assert sum("job.sh" in c for c in cloud.lines("calls.log")) == 1  # launched once
    assert kept["state"] == "ACTIVE"  # kept for inspection
    assert json.loads((state / "status.json").read_text())["restarts"] == 0


# --- without a trainer: bad input, the verdicts, the completion record ---------------------------------
@pytest.mark.parametrize("command, message", [
    (["info"], "must be pretrain or precompute-targets"),
    (["pretrain", "--config", "c.yaml"], "give train.output_dir="),
    (["pretrain", "train.output_dir=runs/a"], "relative to a worker's disk"),
    (["precompute-targets", "targets.prefix=targets/x"], "relative to a worker's disk"),
])
def test_bad_commands_are_refused_before_anything_runs(tmp_path, capsys, command, message):
    argv = ["--name", "t", "--zone", "z", "--type", "v4-8", "--state-dir", str(tmp_path / "s"), *command]
    assert supervise.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.fixture
def no_gcloud(tmp_path, monkeypatch):
    """A gcloud on PATH that must not run (the supervisor checks for one before it starts)."""
    write_exe(tmp_path / "gcloud", "exit 97\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def verdict(tmp_path, *workers, done=False):
    args = supervise.parse_args(["--name", "t", "--zone", "z", "--type", "v4-8", "--stall-minutes", "1",
                                 "pretrain", f"train.output_dir={tmp_path}"])
    if done:
        (tmp_path / "done.json").write_text("{}")
    status = supervise.Status("t", "pretrain")
    records = supervise.Records(tmp_path, status)
    rows = [{"host": f"w{i}", "log_age": age, "progress": "5/9", "state": state, "rc": rc}
            for i, (state, rc, age) in enumerate(workers)]
    return supervise.Supervisor(args, records).judge(rows)


def test_verdicts(tmp_path, monkeypatch, no_gcloud):
    monkeypatch.setattr(supervise.Slice, "last_lines", lambda self: "(the log)")  # the slow tests read a real one
    assert verdict(tmp_path, ("running", None, 59), ("running", None, 3)) == "running"
    assert verdict(tmp_path, ("running", None, 61), ("running", None, 3)).startswith("hung on w0")
    assert verdict(tmp_path, ("exited", 0, 0), ("exited", 0, 0)).startswith("exited 0 before")
    assert verdict(tmp_path, ("exited", 0, 0), ("exited", 0, 0), done=True) == "finished"
    assert verdict(tmp_path, ("exited", 1, 0), ("vanished", None, 0)).startswith("job ended")
    with pytest.raises(supervise.GiveUp) as stop:
        verdict(tmp_path, ("exited", 3, 0), ("exited", 0, 0))
    assert stop.value.code == 3 and "(the log)" in str(stop.value)
    with pytest.raises(supervise.GiveUp) as stop:
        verdict(tmp_path, ("exited", 2, 0))
    assert stop.value.code == 2
    # a gs:// run lock the killed job left: waited out, not a config error
    monkeypatch.setattr(supervise.Slice, "last_lines", lambda self: "xla-trainer: error: gs://b/r is in use by another run")
    assert verdict(tmp_path, ("exited", 2, 0)) == "run lock held"


def test_completion_record_is_written_whole_and_forgotten_when_steps_remain(tmp_path):
    record_completion(str(tmp_path), "pretrain", 30, 30)
    assert json.loads((tmp_path / "done.json").read_text())["step"] == 30
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]  # no temporary left
    forget_completion(str(tmp_path))
    [aside] = [p.name for p in tmp_path.iterdir()]
    assert aside.startswith("done.json.replaced-")  # kept, not deleted
    forget_completion(str(tmp_path))  # nothing to forget: no error


def test_pretrain_records_completion_only_when_its_schedule_is_done(embedded_root, tmp_path):
    """done.json (what the supervisor waits for): not after a stop at a step, written by the run
    that completes the schedule, moved aside (kept) when a longer schedule resumes the run."""
    run = {**RUN, "train.epochs": 1}
    assert run_here(["pretrain", *toy_overrides(embedded_root, tmp_path, **run, **{"train.stop_at_step": 4})]).returncode == 0
    assert not (tmp_path / "done.json").exists()
    assert run_here(["pretrain", *toy_overrides(embedded_root, tmp_path, **run)]).returncode == 0
    assert json.loads((tmp_path / "done.json").read_text())["step"] == STEPS // 2
    longer = run_here(["pretrain", *toy_overrides(embedded_root, tmp_path, **RUN, **{"train.stop_at_step": 16,
                                                                                    "train.allow_resume_change": "[train.epochs]"})])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert not (tmp_path / "done.json").exists()
    [aside] = tmp_path.glob("done.json.replaced-*")
    assert json.loads(aside.read_text())["step"] == STEPS // 2


def test_counts_go_on_after_a_killed_supervisor_but_not_after_one_that_ended(tmp_path):
    for state, restarts in (("running", 3), ("restarting", 3), ("finished, slice deleted", 0), ("stopped (2)", 0)):
        (tmp_path / "status.json").write_text(json.dumps({"state": state, "restarts": 3, "failed_creates": 1}))
        assert supervise.previous_status(tmp_path, "t", "pretrain").restarts == restarts, state
