"""One writer per run directory (xla_trainer.runlock): a flock on local disk, a lease object with
generation preconditions on GCS (fake-gcs-server on 127.0.0.1), and two real launches at once."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from conftest import REPO, read_metrics, toy_overrides
from xla_trainer.config import ConfigError
from xla_trainer.runlock import LOCK_FILE, RunLock

HOST = socket.gethostname()


# --- local disk: flock --------------------------------------------------------------------------
def test_local_live_lock_is_refused_naming_its_holder(tmp_path):
    out = tmp_path / "new" / "run"  # created if missing
    with RunLock(f"file://{out}") as held:
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["host"] == HOST and holder["pid"] == os.getpid()
        assert {"started", "refreshed"} <= set(holder)
        for take_over in (False, True):  # a live local lock is never forced
            with pytest.raises(ConfigError, match=rf"in use by another run \(host {HOST}, pid {os.getpid()}, "
                                                  r"started .*train.take_over does not apply"):
                RunLock(str(out), take_over).acquire()
        assert not held.lost
    assert not (out / LOCK_FILE).exists()  # released: removed
    RunLock(str(out)).acquire().release()


def test_local_lock_of_a_killed_process_is_taken_without_take_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from xla_trainer.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"pid {holder.pid}, started"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release
        holder.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the stale content stays
    lock = RunLock(str(tmp_path)).acquire()  # take_over not needed: the kernel dropped the flock
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "left behind" in caplog.text
    lock.release()


def test_local_release_removes_only_its_own_lock(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    (tmp_path / LOCK_FILE).unlink()  # e.g. someone cleaned the directory by hand ...
    second = RunLock(str(tmp_path)).acquire()  # ... and another launch took a new lock file
    first.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="in use by another run"):  # still held, by `second`
        RunLock(str(tmp_path)).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


# --- GCS: a lease object ------------------------------------------------------------------------
def lease(url: str) -> dict:
    return json.loads(fsspec.filesystem("gs").cat(f"{url}/{LOCK_FILE}"))


def test_gs_live_lease_is_refused_even_with_take_over(gcs_bucket):
    url = f"{gcs_bucket}/run"
    with RunLock(url, refresh_every=0.2) as held:
        first, generation = lease(url), held._generation
        assert first["host"] == HOST and first["pid"] == os.getpid()
        time.sleep(0.6)
        assert held._generation != generation and not held.lost  # refreshed, and still ours
        with pytest.raises(ConfigError, match=rf"in use by another run \(host {HOST}, pid {os.getpid()}, started "
                                              r".*, last refreshed .*lease was refreshed \d+ s ago"):
            RunLock(url, take_over=True).acquire()
    assert not fsspec.filesystem("gs").exists(f"{url}/{LOCK_FILE}")  # released: removed


def test_gs_stale_lease_is_refused_without_take_over_and_taken_with_it(gcs_bucket, caplog):
    url = f"{gcs_bucket}/run"
    dead = {"host": "tpu-vm-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00",
            "refreshed": "2026-01-01T01:00:00+00:00"}  # a launch that died long ago
    fsspec.filesystem("gs").pipe(f"{url}/{LOCK_FILE}", json.dumps(dead).encode())
    with pytest.raises(ConfigError, match=r"stale run lock \(host tpu-vm-7, pid 4242, started 2026-01-01T00:00:00"
                                          r"\+00:00, last refreshed 2026-01-01T01:00:00\+00:00.*train.take_over=true"):
        RunLock(url).acquire()
    assert lease(url) == dead  # untouched
    with RunLock(url, take_over=True):
        assert lease(url)["pid"] == os.getpid()
        assert "took over the stale run lock of host tpu-vm-7, pid 4242" in caplog.text


def test_gs_two_takers_of_a_stale_lease_only_one_wins(gcs_bucket):
    url = f"{gcs_bucket}/run"
    fsspec.filesystem("gs").pipe(f"{url}/{LOCK_FILE}", json.dumps(
        {"host": "gone", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "refreshed": "2026-01-01T00:00:00+00:00"}).encode())
    locks, results, start = [RunLock(url, take_over=True) for _ in range(2)], [], threading.Barrier(2)

    def take(lock):
        start.wait()
        try:
            results.append(lock.acquire())
        except ConfigError as e:
            results.append(e)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, RunLock)]
    assert len(winners) == 1, results
    assert lease(url)["token"] == winners[0]._holder["token"]
    winners[0].release()


def test_gs_holder_that_was_taken_over_has_lost_and_leaves_the_new_lock(gcs_bucket, caplog):
    url = f"{gcs_bucket}/run"
    first = RunLock(url, refresh_every=0.2).acquire()
    # a launch to which the lease looked stale (stale_after=0: any lease does) takes it over
    second = RunLock(url, take_over=True, stale_after=0).acquire()
    deadline = time.monotonic() + 10
    while not first.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.lost and "this run lost its lock" in caplog.text
    assert not second.lost
    first.release()  # not ours any more: left alone
    assert lease(url)["token"] == second._holder["token"]
    second.release()
    assert not fsspec.filesystem("gs").exists(f"{url}/{LOCK_FILE}")


# --- two real launches at once on one output_dir -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_two_launches_at_once_one_runs_one_exits_2(where, embedded_root, tmp_path, request, monkeypatch):
    out = tmp_path / "run" if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/run"
    monkeypatch.setenv("HOME", str(tmp_path))  # the gs:// run's local metrics mirror
    args = [sys.executable, "-m", "xla_trainer", "pretrain", *toy_overrides(embedded_root, out, **{
        "train.stop_at_step": 6, "objective.seconds_per_step": 2})]  # the winner trains >= 12 s
    procs = [subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (winner, _, _), = [r for r in results if r[0].returncode == 0]
    (_, _, err), = [r for r in results if r[0].returncode == 2]
    assert f"in use by another run (host {HOST}, pid {winner.pid}, started" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    if where == "local":
        rows = read_metrics(out)
    else:
        rows = [json.loads(line) for line in fsspec.filesystem("gs").cat(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer: no row twice


def test_a_run_whose_lock_was_taken_over_stops_without_saving(embedded_root, tmp_path, monkeypatch, capsys):
    """The loop reads `lost` at its log steps: a run taken over (a gs:// lease that looked stale)
    stops with exit 2 at the first one and saves nothing more. Here the lock says it was taken
    over once the run holds it, as a refresh that found another generation would."""
    from xla_trainer import loop
    from xla_trainer.cli import main

    class TakenOver(RunLock):
        lost = True

    monkeypatch.setattr(loop, "RunLock", TakenOver)
    out = tmp_path / "run"
    assert main(["pretrain", *toy_overrides(embedded_root, out, **{"train.ckpt_every": 1})]) == 2
    err = capsys.readouterr().err
    assert f"another launch took the run lock of {out} over; this one stops without saving" in err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
