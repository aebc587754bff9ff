"""SIGTERM to a real training process: it finishes its step, saves, exits 0, and the relaunch
continues the loss curve as if uninterrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_metrics, run_cli, run_here, toy_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves it out


@pytest.mark.parametrize("backend,env", [
    ("cpu", {}), pytest.param("xla", {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}, marks=pytest.mark.xla)])
def test_sigterm_saves_exits_zero_and_resumes(embedded_root, tmp_path, backend, env):
    steps = {"train.stop_at_step": 20, "data.num_workers": 2, "runtime.backend": backend}
    launch = (lambda args: run_cli(args, env=env)) if backend == "xla" else run_here
    full = launch(["pretrain", *toy_overrides(embedded_root, tmp_path / "full", **steps)])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "run"
    args = toy_overrides(embedded_root, out, **steps, **{"train.ckpt_every": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "xla_trainer", "pretrain", *args], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert 5 <= stopped < 20
    assert (out / "checkpoints" / str(stopped) / "commit.json").exists()  # saved although ckpt_every is 1000
    assert f"SIGTERM: saved step {stopped}" in err
    assert not (out / "done.json").exists()  # the completion record: only once the schedule is done

    again = launch(["pretrain", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [r["step"] for r in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-4), x["step"]


@pytest.mark.parametrize("backend,trace_glob", [
    pytest.param("xla", "profile/plugins/profile/*/*.xplane.pb", marks=pytest.mark.xla),
    ("cpu", "profile/*.pt.trace.json")])
def test_profile_steps_write_a_trace(embedded_root, tmp_path, backend, trace_glob):
    extra = {"runtime.backend": backend, "train.profile_steps": "[2, 4]", "train.stop_at_step": 5}
    if backend == "xla":  # the persistent cache is for TPUs; here only that the setting is taken
        extra["runtime.compile_cache"] = str(tmp_path / "cache")
    args = ["pretrain", *toy_overrides(embedded_root, tmp_path, **extra)]
    result = run_cli(args, env={"PJRT_DEVICE": "CPU"}) if backend == "xla" else run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    traces = list(tmp_path.glob(trace_glob))
    assert traces and traces[0].stat().st_size > 1000
    assert "profile of steps 2-3 written" in result.stderr
