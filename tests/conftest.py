import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# One torch thread per test process, subprocesses included: `make test` runs two workers on two
# cores, and two processes of two OpenMP threads each spin against each other (measured: two demo
# trainings side by side took 140 s at two threads each, 32 s at one).
os.environ["OMP_NUM_THREADS"] = "1"
if "torch" in sys.modules:  # imported before this file by a plugin: the variable came too late
    sys.modules["torch"].set_num_threads(1)
# XLA:CPU compiles with LLVM at -O0 in every test process: a tiny model's step compiles in less than
# half the time, which is most of an XLA test run here (measured: a 6-step toy run on 4 devices,
# 20 -> 12 CPU s, the losses equal to 6 digits). TPUs and the project's own runs are unaffected.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
pytest_plugins = ["gcs_fixtures"]
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a pretrained tag fails at once instead of retrying
# the toy objective and backbone (toy_plugins.py) register in every test process and subprocess
os.environ["XLA_TRAINER_PLUGINS"] = "toy_plugins"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
TOY_CONFIG = REPO / "tests" / "toy.yaml"


def toy_overrides(data_root, output_dir, **extra) -> list[str]:
    """The toy objective on a tiny ViT (tests/toy.yaml) on the embedded images: what the
    trainer-generic tests train (a command's --config and overrides)."""
    values = {"data.root": str(data_root), "train.output_dir": str(output_dir), **extra}
    return ["--config", str(TOY_CONFIG), *[f"{k}={v}" for k, v in values.items()]]


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """A D-iGPT small enough for 2 CPU cores: 32 px, 4x4 patch grid, four 2x2 segments."""
    values = {
        "backbone.size": "tiny", "backbone.image_size": 32, "backbone.patch_size": 8,
        "backbone.width": 32, "backbone.depth": 2, "backbone.heads": 2, "objective.decoder_width": 32,
        "objective.decoder_depth": 1, "objective.decoder_heads": 2,
        "teacher.arch": "demo-ViT-T-8", "data.source": "embedded", "data.root": str(data_root),
        "data.num_workers": 0, "train.global_batch": 8, "train.epochs": 2, "train.log_every": 1,
        "train.ckpt_every": 1000, "train.output_dir": str(output_dir), "optim.base_lr": 0.02,
        "optim.warmup_epochs": 0.1, "runtime.backend": "cpu",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "xla_trainer", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`xla-trainer args` in this test process, as run_cli reports it (exit code, stdout, stderr
    with the log): a new process first spends about 5 s importing torch and timm. For runs on the
    CPU backend whose process boundary is not what the test is about (no signals, no kill, no
    torchrun, no XLA device count)."""
    from contextlib import redirect_stderr, redirect_stdout
    from xla_trainer.cli import main
    out, err = io.StringIO(), io.StringIO()
    log = logging.StreamHandler(err)
    log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("xla_trainer").addHandler(log)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
    finally:
        logging.getLogger("xla_trainer").removeHandler(log)
    return subprocess.CompletedProcess(["xla-trainer", *args], code, out.getvalue(), err.getvalue())


def run_spec_here(spec: str, out: str):
    """Every command of the JSON list of `xla-trainer` arguments `spec`, in turn, in this process
    (run_here); what each gave into `out`: the body of tests/xla_runs.py's and eager_runs.py's
    processes, which run several trainings per process start."""
    logging.basicConfig(handlers=[logging.NullHandler()])  # each run's log goes to its own stderr only
    done = [run_here(args) for args in json.loads(Path(spec).read_text())]
    Path(out).write_text(json.dumps([{"args": r.args, "code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
                                     for r in done]))


def read_spec_results(out) -> list[subprocess.CompletedProcess]:
    """What run_spec_here wrote into `out`, run by run."""
    return [subprocess.CompletedProcess(r["args"], r["code"], r["stdout"], r["stderr"])
            for r in json.loads(Path(out).read_text())]


def linprobe(digits_root, output_dir, init, *args: str) -> subprocess.Popen:
    """A linear probe on the digits, started in the background (the default: the demo's config)."""
    return subprocess.Popen(
        [sys.executable, "-m", "xla_trainer", "linprobe", *args, f"train.init={init}", f"data.root={digits_root}",
         f"train.output_dir={output_dir}"],
        cwd=REPO, env={**os.environ, "PJRT_DEVICE": "CPU"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def linprobe_top1(proc: subprocess.Popen) -> float:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return float(re.search(r"linprobe: top-1 ([\d.]+)%", out).group(1))


def pretrain_then_probe(config: str, probe_config: str, embedded_root, digits_root, out) -> tuple:
    """A shipped demo pre-training config as it is (XLA:CPU), then `probe_config`'s linear probe on
    the digits from its output and from random init, side by side: (metrics rows, the two top-1s)."""
    result = run_cli(["pretrain", "--config", config, f"data.root={embedded_root}", f"train.output_dir={out}"],
                     env={"PJRT_DEVICE": "CPU"})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = ("--config", probe_config)
    runs = (linprobe(digits_root, out / "probe", out, *probe),
            linprobe(digits_root, out / "probe-random", "null", *probe))
    return read_metrics(out), *(linprobe_top1(r) for r in runs)


def fails_cleanly(capsys, argv) -> str:
    """`xla-trainer argv` in this process: exit 2 and one error line, no traceback; that line."""
    from xla_trainer.cli import main
    capsys.readouterr()  # what came before
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xla-trainer: error: ") and "Traceback" not in err
    return err


def read_metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    from xla_trainer.data.generated import prepare_embedded
    return prepare_embedded(tmp_path_factory.mktemp("data") / "embedded")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from xla_trainer.data.generated import prepare_digits
    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def tiny_eval_overrides(digits_root, output_dir, **extra) -> list[str]:
    """An evaluation small enough for 2 CPU cores: a 2-block width-32 ViT on 32-px digits."""
    values = {
        "backbone.size": "tiny", "backbone.image_size": 32, "backbone.patch_size": 8, "backbone.width": 32,
        "backbone.depth": 2, "backbone.heads": 2, "train.init": None, "data.source": "digits",
        "data.root": str(digits_root), "data.num_workers": 0, "data.eval_resize": 32,
        "train.global_batch": 64, "train.eval_batch": 96, "train.epochs": 1, "train.log_every": 5,
        "train.output_dir": str(output_dir),
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


# The longest files first: with one file per xdist worker, a long file started last would run alone.
LONGEST_FIRST = ("test_learning.py", "test_shards.py", "test_supervise.py", "test_xla_spmd.py", "test_faults.py",
                 "test_eval.py", "test_preemption.py", "test_xla_checkpoints.py", "test_resume.py", "test_fsdp.py",
                 "test_adventurer.py", "test_supervised.py", "test_crate_alpha.py", "test_install.py", "test_cli.py",
                 "test_run_lock.py", "test_ddp.py", "test_convert.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
