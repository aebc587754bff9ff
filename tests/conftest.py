import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["gcs_fixtures"]
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a pretrained tag fails at once instead of retrying


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """A D-iGPT small enough for 2 CPU cores: 32 px, 4x4 patch grid, four 2x2 segments."""
    values = {
        "model.backbone": "tiny", "model.image_size": 32, "model.patch_size": 8,
        "model.width": 32, "model.depth": 2, "model.heads": 2, "model.decoder_width": 32,
        "model.decoder_depth": 1, "model.decoder_heads": 2,
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


def read_metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    from xla_trainer.embedded_data import prepare_embedded
    return prepare_embedded(tmp_path_factory.mktemp("data") / "embedded")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from xla_trainer.embedded_data import prepare_digits
    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def tiny_eval_overrides(digits_root, output_dir, **extra) -> list[str]:
    """An evaluation small enough for 2 CPU cores: a 2-block width-32 ViT on 32-px digits."""
    values = {
        "model.backbone": "tiny", "model.image_size": 32, "model.patch_size": 8, "model.width": 32,
        "model.depth": 2, "model.heads": 2, "model.init": None, "data.source": "digits",
        "data.root": str(digits_root), "data.num_workers": 0, "data.eval_resize": 32,
        "train.global_batch": 64, "train.eval_batch": 96, "train.epochs": 1, "train.log_every": 5,
        "train.output_dir": str(output_dir),
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]
