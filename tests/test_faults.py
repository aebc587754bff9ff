"""Faults injected into real training processes, each checked for what it must never cost: a
non-finite update (stop and skip, on CPU, DDP and FSDP2 over gloo and 4 XLA devices), kill -9 at random
points of checkpoint saves, truncated checkpoint files, config drift on resume, Ctrl-C. After each,
nothing the run had is lost, no checkpoint holds a non-finite value, and a resumed run's losses
equal an uninterrupted run's. (Concurrent launches: test_run_lock.py; bad input: test_bad_input.py.)"""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import eager_runs
import xla_runs
from conftest import REPO, read_metrics, run_here, tiny_eval_overrides, toy_overrides
from xla_trainer.checkpoint import committed_steps, damage, read_checkpoint
from xla_trainer.cli import main
from xla_trainer_models.backbones.vit import ViTClassifier, ViTConfig

pytestmark = pytest.mark.slow  # make test-fast leaves it out


def pretrain(backend: str, data_root, out, **extra) -> subprocess.CompletedProcess:
    """The toy pre-training on `backend`: cpu (in this process) or ddp (2 gloo processes)."""
    args = toy_overrides(data_root, out, **extra)
    if backend == "ddp":
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "xla_trainer", "pretrain", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    return run_here(["pretrain", *args])


def pretrain_in_turn(backend: str, data_root, out, *launches: dict) -> list[subprocess.CompletedProcess]:
    """Launches of the toy pre-training on one output_dir, one after the other (each dict: its
    overrides); on xla all in one process on 4 CPU devices (tests/xla_runs.py), a 2 x 2 data x
    fsdp mesh: parameters and optimizer state sharded too; on fsdp2 all in one launch of 2 gloo
    processes (tests/eager_runs.py), FSDP2 over a [1, 2] mesh, process 0's reports."""
    if backend == "fsdp2":
        argv = [["pretrain", *toy_overrides(data_root, out, **{"runtime.mesh": "[1,2]"}, **extra)] for extra in launches]
        return [per_process[0] for per_process in eager_runs.run(2, argv, out.parent / "eager_runs.json")]
    if backend != "xla":
        return [pretrain(backend, data_root, out, **extra) for extra in launches]
    xla = {"runtime.backend": "xla", "runtime.mesh": "[2,2]"}
    spec = out.parent / "xla_runs.json"
    argv = [["pretrain", *toy_overrides(data_root, out, **xla, **extra)] for extra in launches]
    return xla_runs.run(4, argv, spec)


def checkpoint_tensors(out, step) -> dict:
    """Every tensor of a checkpoint, flat: model.*, optimizer.<i>.*, extra tensors."""
    state = read_checkpoint(str(out / "checkpoints" / str(step)))
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"optimizer.{i}.{k}": v for i, s in state["optimizer"].items() for k, v in s.items()})
    return flat


def assert_all_finite(out):
    steps = committed_steps(str(out / "checkpoints"))
    assert steps
    for step in steps:
        bad = [k for k, v in checkpoint_tensors(out, step).items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (step, bad[:5])
    return steps


def assert_same_losses(reference, rows, tol=1e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for x, y in zip(reference, rows):
        if x["loss"] is None or y["loss"] is None:
            assert x["loss"] == y["loss"], x["step"]
        else:
            assert y["loss"] == pytest.approx(x["loss"], rel=tol, abs=tol), x["step"]


# --- non-finite steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "ddp", "fsdp2", pytest.param("xla", marks=pytest.mark.xla)])
def test_a_nonfinite_step_is_never_applied_or_saved(embedded_root, tmp_path, backend):
    """The loss of step 4 is NaN (the toy objective's fault knob). stop: the run ends naming step
    4 and the newest checkpoint (3), nothing newer saved. The relaunch with train.nonfinite=skip
    resumes from 3, skips step 4 (weights and optimizer state untouched: checkpoint 4 equals
    checkpoint 3) and finishes with finite losses; every saved tensor is finite."""
    out = tmp_path / "run"
    fault = {"objective.nan_at_forward": 4, "train.ckpt_every": 1, "train.keep_checkpoints": 0,
             "train.stop_at_step": 6}
    stopped, skipped = pretrain_in_turn(backend, embedded_root, out, fault, {**fault, "train.nonfinite": "skip"})
    assert stopped.returncode == (1 if backend == "ddp" else 3), stopped.stderr[-3000:]  # torchrun: 1
    assert ("step 4 was not applied: loss nan" in stopped.stderr and
            f"nothing newer is saved, the newest checkpoint (every tensor finite) is {out}/checkpoints/3"
            in stopped.stderr), stopped.stderr[-3000:]
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/3 at step 3" in skipped.stderr
    assert assert_all_finite(out) == [1, 2, 3, 4, 5, 6]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["loss"] is None and rows[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 4)
    before, after = checkpoint_tensors(out, 3), checkpoint_tensors(out, 4)
    for key in before:
        if key != "model.forwards":  # the fault knob's own call counter
            assert torch.equal(before[key], after[key]), key


def test_an_absurd_learning_rate_stops_with_finite_checkpoints(embedded_root, tmp_path):
    """lr 1e12: the weights blow up within a few steps; whichever step turns non-finite first
    (loss, gradient or update) is not applied, and the export of the run's weights is finite."""
    out = tmp_path / "run"
    result = pretrain("cpu", embedded_root, out, **{"optim.base_lr": 1e12, "optim.warmup_epochs": 0,
                                                    "train.ckpt_every": 1, "train.stop_at_step": 8})
    assert result.returncode == 3, result.stderr[-2000:]
    bad_step = int(re.search(r"step (\d+) was not applied", result.stderr).group(1))
    assert assert_all_finite(out)[-1] == bad_step - 1
    assert main(["export-timm", str(out), str(tmp_path / "vit.safetensors")]) == 0


# --- kill -9 during saves -----------------------------------------------------------------------
def test_kill_9_during_saves_loses_nothing(embedded_root, tmp_path):
    """A run saving at every step is killed with SIGKILL at random moments, three times, then run
    to its end: the relaunches need no take-over (the lock dies with its holder), every committed
    checkpoint is intact, and the loss curve equals an uninterrupted run's, each step once. With
    loader workers, which outlive a killed trainer by seconds and share its lock: the relaunch
    waits for them."""
    steps = {"train.stop_at_step": 30, "train.ckpt_every": 1, "data.num_workers": 2}
    full = pretrain("cpu", embedded_root, tmp_path / "full", **steps)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    args = toy_overrides(embedded_root, out, **steps)
    rng = random.Random(0)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "xla_trainer", "pretrain", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = 5 * (trial + 1) + rng.randrange(4)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(rows_of(out)) < target:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)  # somewhere inside the next steps and their saves
        proc.kill()
        proc.wait()
    last = run_here(["pretrain", *args])
    assert last.returncode == 0, last.stderr[-3000:]
    for step in committed_steps(str(out / "checkpoints")):
        assert damage(str(out / "checkpoints" / str(step))) is None, step
    assert_same_losses(read_metrics(tmp_path / "full"), read_metrics(out))


def rows_of(out) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


# --- damaged checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(embedded_root, tmp_path_factory):
    """A finished toy run of 6 steps with checkpoints 4 and 6 (its whole curve in metrics.jsonl)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = pretrain("cpu", embedded_root, out, **{"train.stop_at_step": 6, "train.ckpt_every": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_run(saved_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(embedded_root, saved_run, tmp_path, victim):
    out = copy_run(saved_run, tmp_path)
    newest = out / "checkpoints" / "6"
    data = (newest / victim).read_bytes()
    (newest / victim).write_bytes(data[: len(data) // 2])
    # every reader refuses it by name, whole run or folder alike
    for path in (newest, out):
        assert main(["export-timm", str(path), str(tmp_path / "w.safetensors")]) == 2
    resumed = pretrain("cpu", embedded_root, out, **{"train.stop_at_step": 6, "train.ckpt_every": 2})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {newest} is damaged: {victim}" in resumed.stderr
    assert f"resumed from {out}/checkpoints/4 at step 4" in resumed.stderr
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("6.damaged-")]
    assert len(aside) == 1 and (aside[0] / victim).read_bytes() == data[: len(data) // 2]  # kept as it was
    assert damage(str(newest)) is None  # saved anew
    assert_same_losses(read_metrics(saved_run), read_metrics(out))
    replaced = list(out.glob("metrics.jsonl.replaced-*"))  # the rows of steps 5, 6 it ran again
    assert len(replaced) == 1 and [json.loads(r)["step"] for r in replaced[0].read_text().splitlines()] == [5, 6]


def test_a_checkpoint_that_fails_to_load_is_set_aside(embedded_root, saved_run, tmp_path, capsys):
    """Bytes overwritten in place (every size as committed): the load fails, the checkpoint is set
    aside and the one before it resumes; when none loads, exit 2 instead of training from a model
    that holds part of one."""
    out = copy_run(saved_run, tmp_path)
    for step in (6, 4):
        shard = out / "checkpoints" / str(step) / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[: len(data) // 2] = bytes(len(data) // 2)
        shard.write_bytes(bytes(data))
        if step == 6:
            resumed = pretrain("cpu", embedded_root, out, **{"train.stop_at_step": 6, "train.ckpt_every": 2})
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert f"checkpoint {out}/checkpoints/6 cannot be read" in resumed.stderr
            assert f"resumed from {out}/checkpoints/4 at step 4" in resumed.stderr
            assert_same_losses(read_metrics(saved_run), read_metrics(out))
    for name in ("4", "6"):  # run the failing load again on both: the new 6 damaged as well
        shard = out / "checkpoints" / name / "__0_0.distcp"
        shard.write_bytes(bytes(len(shard.read_bytes())))
    assert main(["pretrain", *toy_overrides(embedded_root, out, **{"train.stop_at_step": 6})]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint of {out}/checkpoints could be read ({out}/checkpoints/6, {out}/checkpoints/4" in err
    assert len([p for p in (out / "checkpoints").iterdir() if ".damaged-" in p.name]) >= 3  # all kept


def test_every_reader_refuses_a_damaged_or_unfinished_checkpoint(saved_run, digits_root, tmp_path, capsys):
    """export-timm, train.init of the probes and k-NN, visualize: exit 2 naming the checkpoint."""
    out = copy_run(saved_run, tmp_path)
    (out / "checkpoints" / "6" / "commit.json").unlink()  # as a save killed before its commit
    (out / "checkpoints" / "4" / "__0_0.distcp").write_bytes(b"")
    cases = {out / "checkpoints" / "6": "no commit.json: a save that did not finish",
             out / "checkpoints" / "4": "__0_0.distcp is 0 bytes; it had"}
    for path, why in cases.items():
        eval_args = tiny_eval_overrides(digits_root, tmp_path / "eval", **{"train.init": str(path),
                                                                            "runtime.backend": "cpu"})
        for argv in (["export-timm", str(path), str(tmp_path / "w.safetensors")], ["knn", *eval_args],
                     ["linprobe", *eval_args], ["visualize", "--out", str(tmp_path / "v.png"), *eval_args]):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"{path} is not a whole checkpoint: {why}" in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "v.png").exists()


def test_train_init_that_does_not_fit_names_the_keys(saved_run, digits_root, tmp_path, capsys):
    """Another width: the first mismatching keys and their shapes. A ViT without a cls token (an
    XTRA encoder) into a probe config with one: what to set, not a reshape traceback."""
    eval_args = lambda init, **extra: tiny_eval_overrides(digits_root, tmp_path / "eval", **{
        "train.init": init, "runtime.backend": "cpu", **extra})
    assert main(["linprobe", *eval_args(str(saved_run), **{"backbone.width": 64})]) == 2
    err = capsys.readouterr().err
    assert f"train.init '{saved_run}' does not fit backbone.*" in err
    assert "shapes differ: ['cls_token (1, 1, 32) there, (1, 1, 64) here'" in err
    no_cls = ViTClassifier(ViTConfig(size="tiny", image_size=32, patch_size=8, width=32, depth=2, heads=2,
                                     cls_token=False, final_norm=True))
    torch.save(no_cls.state_dict(), tmp_path / "xtra.pth")
    for command in ("linprobe", "knn", "finetune"):
        assert main([command, *eval_args(str(tmp_path / "xtra.pth"))]) == 2
        err = capsys.readouterr().err
        assert "its ViT has no cls token, while backbone.cls_token is true; set backbone.cls_token=false" in err


def test_no_intact_checkpoint_is_exit_2_naming_them_all(saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path)
    for step in (4, 6):
        (out / "checkpoints" / str(step) / ".metadata").write_bytes(b"")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = toy_overrides(tmp_path / "unused", out, **{"train.stop_at_step": 6})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert f"no intact checkpoint under {out}/checkpoints: {out}/checkpoints/6: .metadata" in err
    assert f"{out}/checkpoints/4: .metadata" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing moved


# --- config drift -------------------------------------------------------------------------------
@pytest.mark.parametrize("change,expected", [
    ({"train.global_batch": 16}, "with train.global_batch: 8 -> 16 changes the schedule or the data order"),
    ({"optim.base_lr": 0.01, "train.seed": 3}, "optim.base_lr: 0.02 -> 0.01, train.seed: 0 -> 3"),
    ({"backbone.width": 64}, "saved under another model or loss (backbone.width: 32 -> 64)"),
    ({"objective.keep": 1.0}, "saved under another model or loss (objective.keep: 0.5 -> 1.0)"),
])
def test_a_resume_under_another_config_is_refused(embedded_root, saved_run, tmp_path, capsys, change, expected):
    out = copy_run(saved_run, tmp_path)
    args = toy_overrides(embedded_root, out, **{"train.stop_at_step": 8, **change})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and f"{out}/checkpoints/6" in err, err
    assert ("allow_resume_change" in err) != ("model or loss" in err)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]


def test_an_allowed_change_resumes_and_is_logged(embedded_root, saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    allowed = {"train.stop_at_step": 8, "train.seed": 3, "train.allow_resume_change": "[train.seed]",
               "train.log_every": 2}  # log_every: operational, never asked for
    result = pretrain("cpu", embedded_root, out, **allowed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {out}/checkpoints/6 with train.seed: 0 -> 3 (train.allow_resume_change)" in result.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6, 8]


# --- Ctrl-C -------------------------------------------------------------------------------------
def start_in_group(args, env=None) -> subprocess.Popen:
    """A training process in a session of its own: a signal to the group reaches its loader
    workers too, as Ctrl-C in a terminal does."""
    return subprocess.Popen([sys.executable, "-m", "xla_trainer", "pretrain", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_rows(proc, out, count: int):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(rows_of(out)) < count:
        time.sleep(0.02)


def test_ctrl_c_saves_exits_130_and_resumes(embedded_root, tmp_path):
    steps = {"train.stop_at_step": 20, "data.num_workers": 2}
    full = pretrain("cpu", embedded_root, tmp_path / "full", **steps)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    args = toy_overrides(embedded_root, out, **steps)
    proc = start_in_group(args)
    wait_for_rows(proc, out, 5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert 5 <= stopped < 20 and "Traceback" not in err
    assert f"Ctrl-C: saved step {stopped} to {out}/checkpoints/{stopped}" in err
    again = run_here(["pretrain", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_losses(read_metrics(tmp_path / "full"), read_metrics(out), tol=1e-4)


def test_a_second_ctrl_c_aborts_at_once():
    """The loop's signal handling in a process of its own: the first Ctrl-C is taken as a request
    to stop after the step, the second ends the process at once with 130."""
    script = (
        "import os, signal, time\n"
        "from xla_trainer.loop import StopSignals\n"
        "from xla_trainer.runtime import Runtime\n"
        "signals = StopSignals(Runtime('fp32'), 1)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.1)\n"
        "print('first:', signals.received, signals.agreed(1), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stdout == "first: SIGINT True\n"
    assert "second Ctrl-C: aborting without saving" in result.stderr
