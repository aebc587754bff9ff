"""Several `xla-trainer pretrain` runs in ONE process (PJRT_DEVICE=CPU, CPU_NUM_DEVICES as set),
one after the other: python xla_runs.py SPEC.json writes, for each run of the spec (a JSON list of
argument lists), its exit code, stdout and stderr into SPEC.json.out. One process per device
count saves the XLA start-up of every run but the first (tests/test_xla_spmd.py)."""
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout

from xla_trainer.cli import main

results = []
spec = sys.argv[1]
for args in json.load(open(spec)):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
with open(spec + ".out", "w") as f:
    json.dump(results, f)
