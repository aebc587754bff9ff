"""Metrics: one JSON object per log step in <output_dir>/metrics.jsonl and tensorboardX events.

For a gs:// output_dir both are written to a local mirror and uploaded at every checkpoint and at
the end (objects cannot be appended to, and tensorboardX's own gs:// writer re-uploads and hangs
at exit when the bucket is unreachable)."""
import hashlib
import json
import math
import os
from pathlib import Path

import fsspec
from tensorboardX import SummaryWriter


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, start_step: int | None = None):
        """`start_step`: a training run's first step; rows a crashed run logged after it are dropped.
        None (k-NN, or a run directory shared with other commands): rows are only appended."""
        self.output_dir, self.enabled = output_dir, enabled
        self.remote = "://" in output_dir and not output_dir.startswith("file://")
        if self.remote:
            tag = hashlib.sha1(output_dir.encode()).hexdigest()[:12]
            self.local_dir = Path(os.path.expanduser("~/.cache/xla-trainer/runs")) / tag
        else:
            self.local_dir = Path(output_dir)
        self.path = self.local_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                self._drop_rows_after(start_step)
            # purge_step drops events a crashed run logged after its last checkpoint
            self.writer = SummaryWriter(str(self.local_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _drop_rows_after(self, step: int):
        """A resumed run repeats the steps after its checkpoint: forget their old rows."""
        if not self.path.exists():
            return
        with open(self.path) as f:
            keep = [line for line in f if json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

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
        if self.enabled and self.remote:
            fs, root = fsspec.core.url_to_fs(self.output_dir)
            fs.put(str(self.local_dir) + "/", root, recursive=True)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.upload()
