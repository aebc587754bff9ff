"""`pip install .` (not editable) into a fresh venv, used from outside the checkout: the default
config and the shipped configs come with the package, and the model package, installed as
`xla_trainer_models`, leaves an unrelated `models` package alone."""
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def site_packages() -> list[str]:
    """The folders this interpreter imports torch & co. from. The fresh venv borrows them as plain
    path entries (no download): their .pth files, this checkout's editable install among them, are
    not run there."""
    return [p for p in dict.fromkeys(sys.path + site.getsitepackages()) if p.endswith("site-packages")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, a working folder outside the checkout) after `pip install .`."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    # without pip: the borrowed pip and setuptools (the test extra's, new enough to build wheels) install
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.run([venv / "bin" / "python", "-c", where], check=True, capture_output=True,
                                  text=True).stdout.strip())
    (purelib / "borrowed.pth").write_text("\n".join(site_packages()) + "\n")
    unrelated = purelib / "models"  # an unrelated package of that common name, installed first
    unrelated.mkdir()
    (unrelated / "__init__.py").write_text("NAME = 'unrelated'\n")
    build = root / "source"  # pip builds in place: a copy keeps build/ and *.egg-info out of the checkout
    for part in ("xla_trainer", "models", "configs"):
        shutil.copytree(REPO / part, build / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, build / part)
    result = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                             "--no-build-isolation", str(build)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def run_installed(installed, *args: str) -> subprocess.CompletedProcess:
    bin_dir, work = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_TRAINER_PLUGINS")}
    return subprocess.run([bin_dir / "xla-trainer", *args], cwd=work, env={**env, "PJRT_DEVICE": "CPU"},
                          capture_output=True, text=True, timeout=600)


def test_the_installed_package_is_not_the_checkout_and_keeps_other_models(installed):
    bin_dir, work = installed
    code = ("import models, xla_trainer, xla_trainer_models, xla_trainer.config as c; "
            "print(models.NAME, xla_trainer.__file__, xla_trainer_models.__file__, c.CONFIG_DIR)")
    result = subprocess.run([bin_dir / "python", "-c", code], cwd=work, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    name, trainer, model_package, config_dir = result.stdout.split()
    assert name == "unrelated"
    for path in (trainer, model_package, config_dir):
        assert not Path(path).resolve().is_relative_to(REPO) and "site-packages" in path, path
    assert (Path(config_dir) / "digpt" / "vit_b16_in1k.yaml").is_file()


def test_describe_reads_a_shipped_config_by_its_name(installed):
    result = run_installed(installed, "describe", "--config", "configs/digpt/vit_b16_in1k.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"backbone": "vit"' in result.stdout and '"objective": "digpt"' in result.stdout


def test_pretrain_runs_its_default_config(installed):
    _, work = installed
    result = run_installed(installed, "pretrain", f"data.root={work / 'embedded'}", f"train.output_dir={work / 'run'}",
                           "train.stop_at_step=2", "runtime.backend=cpu", "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps" in result.stdout and (work / "run" / "metrics.jsonl").is_file()
