"""Several `xla-trainer` runs in ONE process (PJRT_DEVICE=CPU, CPU_NUM_DEVICES as set), one after
the other: a new process spends seconds importing torch_xla and starting PJRT, here once per
device count instead of once per run. Tests call `start` and then `results`; the process itself
is `python xla_runs.py SPEC.json`, which writes each run's exit code, stdout and stderr (the log
included) into SPEC.json.out."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, read_spec_results, run_spec_here


def start(devices: int, runs: list[list[str]], spec: Path) -> subprocess.Popen:
    """The runs (each the arguments of one `xla-trainer` command) on `devices` XLA CPU devices, in
    a process of their own started now."""
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    return subprocess.Popen([sys.executable, __file__, str(spec)], cwd=REPO, env=env)


def results(proc: subprocess.Popen, spec: Path, timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """What each run of `start` gave, once its process has ended."""
    assert proc.wait(timeout=timeout) == 0, f"xla_runs.py {spec} failed"
    return read_spec_results(f"{spec}.out")


def run(devices: int, runs: list[list[str]], spec: Path) -> list[subprocess.CompletedProcess]:
    """`start`, then `results`: the runs, and the wait for them."""
    return results(start(devices, runs, spec), spec)


if __name__ == "__main__":
    run_spec_here(sys.argv[1], f"{sys.argv[1]}.out")
