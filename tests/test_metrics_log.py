"""Metrics rows are never deleted (xla_trainer.metrics.MetricsLogger): a fresh run refuses another
run's rows, a relaunch or resume moves its own replaced rows aside, malformed lines stay, and a
gs:// run resumed on a new machine starts its local mirror from the remote rows."""
import json
import shutil

import fsspec
import pytest

from xla_trainer.config import ConfigError
from xla_trainer.metrics import MetricsLogger

CONFIG = {"optim": {"base_lr": 0.02}, "train": {"epochs": 2, "stop_at_step": None, "log_every": 1},
          "runtime": {"precision": "fp32"}}


def rows(text: str) -> list[int]:
    return [json.loads(line)["step"] for line in text.splitlines()]


def log_steps(logger: MetricsLogger, steps):
    for step in steps:
        logger.log({"step": step, "loss": 1.0 / step})


def test_fresh_run_refuses_another_runs_metrics_and_events(tmp_path):
    theirs = '{"step": 1, "loss": 1.0}\n'
    (tmp_path / "metrics.jsonl").write_text(theirs)
    with pytest.raises(ConfigError, match=rf"{tmp_path}/metrics.jsonl holds another run's metrics \(no "
                                          r"run.json there .*nothing there was touched. Use a new train.output_dir"):
        MetricsLogger(str(tmp_path), True, 0, CONFIG)
    (tmp_path / "run.json").write_text(json.dumps({**CONFIG, "optim": {"base_lr": 0.1}}))
    with pytest.raises(ConfigError, match=r"config \(.*run.json\) differs in optim.base_lr\);"):
        MetricsLogger(str(tmp_path), True, 0, CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "run.json"]  # nothing written
    assert (tmp_path / "metrics.jsonl").read_text() == theirs

    events = tmp_path / "events"  # tensorboard events alone count too
    (events / "tb").mkdir(parents=True)
    (events / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"{events}/tb/ holds another run's metrics"):
        MetricsLogger(str(events), True, 0, CONFIG)


def test_relaunch_of_the_same_run_moves_its_own_rows_aside(tmp_path):
    """A launch that died before its first checkpoint, relaunched: step 0 again, same config but
    for operational keys. Its rows are its own: moved aside, and the relaunch logs afresh."""
    first = MetricsLogger(str(tmp_path), True, 0, CONFIG)
    log_steps(first, [1, 2, 3])
    first.close()
    assert json.loads((tmp_path / "run.json").read_text()) == CONFIG
    again = {**CONFIG, "train": {**CONFIG["train"], "stop_at_step": 9}, "runtime": {"precision": "fp32", "backend": "xla"}}
    second = MetricsLogger(str(tmp_path), True, 0, again)
    log_steps(second, [1])
    second.close()
    assert rows((tmp_path / "metrics.jsonl").read_text()) == [1]
    moved, = tmp_path.glob("metrics.jsonl.replaced-*")
    assert rows(moved.read_text()) == [1, 2, 3]


def test_resume_moves_later_rows_aside_and_keeps_malformed_lines(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4}\n{"step": 5}\n{"step": 6, "lo')
    logger = MetricsLogger(str(tmp_path), True, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 6, "lo\n'
    moved, = tmp_path.glob("metrics.jsonl.replaced-*")
    assert moved.read_text() == '{"step": 4}\n{"step": 5}\n'
    assert f"{path}: line 3, 7: not a metrics row; kept in place and skipped" in caplog.text
    log_steps(logger, [4])  # the cut-short last line got its newline: the new row is a line of its own
    logger.close()
    assert path.read_text().splitlines()[-1] == '{"step": 4, "loss": 0.25}'


# --- a gs:// output_dir: the local mirror -----------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the mirrors live
    return tmp_path / "home"


def remote_steps(url: str, name: str = "metrics.jsonl") -> list[int]:
    return rows(fsspec.filesystem("gs").cat(f"{url}/{name}").decode())


def test_gs_resume_on_a_new_machine_keeps_the_earlier_rows(gcs_bucket, home):
    url = f"{gcs_bucket}/run"
    first = MetricsLogger(url, True, 0, CONFIG)
    log_steps(first, [1, 2, 3, 4])
    first.upload()  # as at the checkpoint of step 4
    log_steps(first, [5, 6])  # then the machine is preempted: never uploaded
    shutil.rmtree(first.local_dir)  # a new machine: an empty mirror

    resumed = MetricsLogger(url, True, 4, CONFIG)
    assert rows(resumed.path.read_text()) == [1, 2, 3, 4]  # the remote rows are the base
    log_steps(resumed, [5, 6, 7])
    resumed.close()
    assert remote_steps(url) == [1, 2, 3, 4, 5, 6, 7]


def test_gs_resume_on_the_same_machine_uploads_the_rows_it_replaced(gcs_bucket, home):
    url = f"{gcs_bucket}/run"
    first = MetricsLogger(url, True, 0, CONFIG)
    log_steps(first, [1, 2])
    first.upload()
    log_steps(first, [3])  # logged after the last upload, in the mirror only
    resumed = MetricsLogger(url, True, 2, CONFIG)  # the mirror continues the remote rows: kept
    resumed.close()
    assert remote_steps(url) == [1, 2]
    moved, = [p.rsplit("/", 1)[-1] for p in fsspec.filesystem("gs").ls(url.removeprefix("gs://"), detail=False)
              if "replaced-" in p]
    assert remote_steps(url, moved) == [3]


def test_gs_fresh_run_refuses_remote_rows_and_sets_a_stale_mirror_aside(gcs_bucket, home):
    url = f"{gcs_bucket}/run"
    fs = fsspec.filesystem("gs")
    old = MetricsLogger(url, True, 0, CONFIG)
    log_steps(old, [1, 2])
    old.close()
    fs.rm(url.removeprefix("gs://"), recursive=True)  # the run's remote files deleted; its mirror is left
    fs.pipe(f"{url}/metrics.jsonl", b'{"step": 8}\n')  # and another run's rows appear there
    with pytest.raises(ConfigError, match=rf"{url}/metrics.jsonl holds another run's metrics"):
        MetricsLogger(url, True, 0, CONFIG)
    assert remote_steps(url) == [8]
    stale, = home.glob(".cache/xla-trainer/runs/*.stale-*")  # the old mirror: set aside, not deleted
    assert rows((stale / "metrics.jsonl").read_text()) == [1, 2]
