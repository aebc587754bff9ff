"""Metrics: one JSON object per log step in <output_dir>/metrics.jsonl and tensorboardX events.

Rows are never deleted:

* A fresh training run (start_step 0) refuses a directory that holds another run's metrics or
  tensorboard events. It records its config in <output_dir>/run.json; a relaunch with the same
  config (operational keys aside: drift.OPERATIONAL) finds its own history there, the rows of a
  launch that died before its first checkpoint, and moves them aside.
* A resumed run (start_step > 0) repeats the steps after its checkpoint: the rows a crashed run
  logged after it move to ``metrics.jsonl.replaced-<UTC time>``; tensorboard gets a purge_step,
  which marks the later events as replaced without touching their files.
* A malformed line stays where it is and is skipped, with one warning naming the file and line.
* k-NN (start_step None) only appends.

For a gs:// output_dir both are written to a local mirror and uploaded at every checkpoint and at
the end (objects cannot be appended to, and tensorboardX's own gs:// writer re-uploads and hangs
at exit when the bucket is unreachable). The mirror starts from the remote metrics.jsonl and
run.json: a run resumed on a new machine (a spot TPU relaunch) must not upload its empty mirror
over the rows of the earlier ones.
"""
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from .config import ConfigError
from .drift import changed_keys, flatten
from .data.remote_io import filesystem, list_names, read_bytes, temporary_of, write_bytes_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def _utc() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def config_changes(ours: dict, theirs: dict) -> list[str]:
    """The keys in which two run configs differ, those that change nothing trained aside
    (drift.changed_keys: where the run logs, how often it saves, which backend runs it)."""
    return list(changed_keys(flatten(theirs), flatten(ours)))


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, start_step: int | None = None,
                 run_config: dict | None = None):
        """`start_step`: a training run's first step (see the module docstring); None (k-NN, or a
        run directory shared with other commands): rows are only appended. `run_config`: a
        training run's config (cfg.to_dict()), which tells its own earlier rows from another's."""
        self.output_dir, self.enabled = output_dir, enabled
        self.remote = "://" in output_dir and not output_dir.startswith("file://")
        if self.remote:
            tag = hashlib.sha1(output_dir.encode()).hexdigest()[:12]
            self.local_dir = Path(os.path.expanduser("~/.cache/xla-trainer/runs")) / tag
        else:
            self.local_dir = Path(output_dir.removeprefix("file://"))
        self.path = self.local_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.remote:
            self._sync_mirror()
        purge = None
        if start_step == 0:
            if self._check_fresh_start(run_config):
                purge = 1
        elif start_step:
            self._move_rows_after(start_step)
            purge = start_step + 1
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._end_last_line()
        # purge_step: tensorboard ignores the events an earlier launch logged from that step on
        self.writer = SummaryWriter(str(self.local_dir / "tb"), purge_step=purge)

    def _url(self, name: str) -> str:
        return f"{self.output_dir.rstrip('/')}/{name}"

    # --- the local mirror of a gs:// output_dir ---------------------------------------------------
    def _sync_mirror(self):
        """Start the mirror from the remote metrics.jsonl and run.json. A mirror left by an
        earlier launch on this machine is kept only if it continues the remote's history (same
        run.json, the remote's rows + those logged after the last upload); otherwise it belongs to
        something else (e.g. a run whose remote files were since deleted) and is moved aside."""
        remote = {name: self._read_remote(name) for name in ("metrics.jsonl", RUN_FILE)}
        local = {name: (self.local_dir / name).read_bytes() if (self.local_dir / name).exists() else None
                 for name in remote}
        mirror_used = self.local_dir.exists() and any(self.local_dir.iterdir())
        continues = (local[RUN_FILE] == remote[RUN_FILE] and any(v is not None for v in remote.values())
                     and (local["metrics.jsonl"] or b"").startswith(remote["metrics.jsonl"] or b""))
        if mirror_used and continues:
            return
        if mirror_used:
            aside = self.local_dir.with_name(f"{self.local_dir.name}.stale-{_utc()}")
            self.local_dir.rename(aside)
            log.warning("the local mirror %s of %s does not continue its remote files; moved to %s",
                        self.local_dir, self.output_dir, aside)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for name, data in remote.items():
            if data is not None:
                write_bytes_atomic(str(self.local_dir / name), data)

    def _read_remote(self, name: str) -> bytes | None:
        try:
            return read_bytes(self._url(name))
        except FileNotFoundError:
            return None

    # --- a fresh start: whose rows are these? -------------------------------------------------------
    def _check_fresh_start(self, run_config: dict | None) -> bool:
        """Refuse another run's history (ConfigError); True when the history found is this run's
        own (its rows moved aside), False when there is none (run.json written)."""
        found = []
        if self.path.exists() and self.path.read_bytes().strip():
            found.append(self._url("metrics.jsonl"))
        tb = self.local_dir / "tb"
        if (tb.is_dir() and any(tb.iterdir())) or (self.remote and list_names(self._url("tb"))):
            found.append(self._url("tb") + "/")
        config = None if run_config is None else json.loads(json.dumps(run_config, default=str))
        run_file = self.local_dir / RUN_FILE
        try:
            theirs = json.loads(run_file.read_bytes())
        except (FileNotFoundError, ValueError):  # none, or not readable: then it says nothing
            theirs = None
        if not found:
            if config is not None and theirs != config:
                write_bytes_atomic(str(run_file), json.dumps(config, indent=1, sort_keys=True).encode())
                if self.remote:  # at once: a relaunch elsewhere must find it
                    write_bytes_atomic(self._url(RUN_FILE), run_file.read_bytes())
            return False
        if config is None:
            why = "this command records no run config to compare"
        elif theirs is None:
            why = f"no {RUN_FILE} there says which run wrote them"
        elif changes := config_changes(config, theirs):
            shown = ", ".join(changes[:5]) + (", ..." if len(changes) > 5 else "")
            why = f"that run's config ({self._url(RUN_FILE)}) differs in {shown}"
        else:
            self._move_rows_after(0)  # a relaunch of this run, which died before its first checkpoint
            return True
        raise ConfigError(f"{' and '.join(found)} {'hold' if len(found) > 1 else 'holds'} another run's metrics "
                          f"({why}); a run starting at step 0 does not write over them, and nothing there was "
                          f"touched. Use a new train.output_dir (or move those files away).")

    # --- rows ---------------------------------------------------------------------------------------
    def _move_rows_after(self, step: int):
        """A resumed run repeats the steps after its checkpoint: their old rows move to a
        metrics.jsonl.replaced-<UTC time> beside it; malformed lines stay in place."""
        if not self.path.exists():
            return
        keep, moved, bad = [], [], []
        for number, line in enumerate(self.path.read_bytes().splitlines(keepends=True), 1):  # bytes: kept as they are
            try:
                row_step = json.loads(line)["step"]
                later = row_step > step
            except (ValueError, TypeError, KeyError):
                if line.strip():
                    bad.append(number)
                keep.append(line)
                continue
            (moved if later else keep).append(line)
        if bad:
            log.warning("%s: line %s: not a metrics row; kept in place and skipped", self.path,
                        ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
        if not moved:
            return
        aside = self.path.with_name(f"{self.path.name}.replaced-{_utc()}")
        with open(aside, "ab") as f:  # written (and synced) before the rows leave metrics.jsonl
            f.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in moved))
            f.flush()
            os.fsync(f.fileno())
        write_bytes_atomic(str(self.path), b"".join(keep))
        log.info("%s: %d rows after step %d (an earlier launch's) moved to %s", self.path, len(moved), step, aside)

    def _end_last_line(self):
        """A crash mid-write can leave a last line without its newline: end it, so that the next
        row starts a line of its own."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def log(self, record: dict, group: str = "train"):
        """One row; `group` names the tensorboard section (and the row's "group" unless train)."""
        if not self.enabled:
            return
        if group != "train":
            record = {"step": record["step"], "group": group, **record}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])
        self.writer.flush()

    def upload(self):
        """Copy the mirror to the gs:// output_dir; metrics.jsonl last, so that rows a resume
        moved aside are up before the shorter metrics.jsonl replaces the longer one."""
        if not (self.enabled and self.remote):
            return
        fs, root = filesystem(self.output_dir)
        files = [p for p in self.local_dir.rglob("*") if p.is_file() and temporary_of(p.name) is None]
        others = [p for p in files if p != self.path]
        if others:
            fs.put([str(p) for p in others], [f"{root}/{p.relative_to(self.local_dir).as_posix()}" for p in others])
        if self.path.exists():
            fs.put_file(str(self.path), f"{root}/{self.path.name}")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.upload()
