"""The fake cloud of the preemption simulation (tests/fake_gcloud.py) as tests set it up, and the
supervisor's command line there: shared by test_supervise.py and test_shards.py."""
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUPERVISE = REPO / "tpu_scripts" / "supervise.sh"


class Cloud:
    """$FAKE_TPU_DIR of the fake gcloud, the environment that puts it first on PATH, and its records."""

    def __init__(self, tmp: Path, faults: list[dict], metrics: Path | None = None, progress_glob: str = ""):
        self.dir = tmp / "cloud"
        (self.dir / "shims").mkdir(parents=True)
        (self.dir / "bin").mkdir()
        (self.dir / "faults.json").write_text(json.dumps(faults))
        venv_bin = Path(sys.executable).parent
        # the worker image's python3: setup.sh's venv is the test's own xla-trainer, its pip a no-op
        write_exe(self.dir / "shims" / "python3", f"""case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && ln -sf {venv_bin}/xla-trainer "$3/bin/xla-trainer" &&
             printf '#!/bin/sh\\n' > "$3/bin/pip" && chmod +x "$3/bin/pip" ;;
  "-c import ensurepip") ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
        write_exe(self.dir / "bin" / "gcloud", f'exec {sys.executable} -S {REPO}/tests/fake_gcloud.py "$@"\n')
        self.env = {**os.environ, "PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}", "FAKE_TPU_DIR": str(self.dir),
                    "FAKE_TPU_METRICS": str(metrics), "FAKE_TPU_PROGRESS_GLOB": progress_glob, "FAKE_TPU_GRACE": "5",
                    "PYTHON": sys.executable}

    def lines(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    def slice(self) -> dict | None:
        path = self.dir / "cloud.json"
        return json.loads(path.read_text()) if path.exists() else None

    def tear_down(self):
        """Delete what a test left: SIGKILL to the jobs' process groups on the fake worker, and the
        slice itself (its watcher process ends with it)."""
        for pid_file in (self.dir / "home" / "xla-trainer-logs").glob("*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        (self.dir / "cloud.json").unlink(missing_ok=True)


def write_exe(path: Path, body: str):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def supervise_cmd(state_dir: Path, *command: str, spot: bool = True) -> list[str]:
    """supervise.sh on a spot slice (`spot` false: an on-demand TPU VM), polling each second, a job
    whose log is silent 21 s hung (a trainer start on a loaded 2-core machine is silent up to about
    10 s)."""
    return [str(SUPERVISE), "--name", "night", "--zone", "z", "--type", "v4-8", *(["--spot"] if spot else []),
            "--poll-seconds", "1", "--stall-minutes", "0.35", "--max-restarts", "8", "--stop-grace", "1", "--ssh-retries", "3",
            "--create-backoff-seconds", "0.1", "--state-dir", str(state_dir), *command]
