"""Several `xla-trainer` runs in ONE torchrun launch of N processes on the eager CPU backend (gloo),
one after the other, every process running each: a launch costs each process seconds importing
torch and joining the process group, here once for all the runs. Tests call `run`; each process
is `python eager_runs.py SPEC.json` under torchrun, and writes each run's exit code, stdout and
stderr (the log included) into SPEC.json.<rank>.out."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, read_spec_results, run_spec_here


def run(processes: int, runs: list[list[str]], spec: Path, timeout: float = 900) -> list[list[subprocess.CompletedProcess]]:
    """The runs (each the arguments of one `xla-trainer` command) on `processes` torchrun processes:
    for each run, what each process gave, in rank order."""
    spec.write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", __file__, str(spec)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [read_spec_results(f"{spec}.{rank}.out") for rank in range(processes)]
    return [list(per_run) for per_run in zip(*ranks)]


if __name__ == "__main__":
    run_spec_here(sys.argv[1], f"{sys.argv[1]}.{os.environ['RANK']}.out")
