"""The command line: help, overrides, and every bad input rejected before anything compiles."""
import json

import pytest

from conftest import read_metrics, run_cli, tiny_overrides
from xla_trainer.cli import main
from xla_trainer.config import ConfigError, load_config


@pytest.mark.parametrize("command", ["pretrain", "bench", "bench-data", "info", "prepare-data", "make-shards",
                                     "index-shards", "precompute-targets"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: xla-trainer " + command in capsys.readouterr().out


def test_top_level_help():
    result = run_cli(["--help"])
    assert result.returncode == 0
    for command in ("pretrain", "bench", "info", "prepare-data"):
        assert command in result.stdout


def test_overrides_and_defaults():
    cfg = load_config(None, ["train.global_batch=64", "optim.base_lr=1e-4", "model.segments=[2, 4]",
                             "optim.clip_grad=1", "teacher.pretrained=null"])
    assert cfg.model.backbone == "tiny"  # the demo config is the default
    assert cfg.train.global_batch == 64 and cfg.optim.base_lr == 1e-4
    assert cfg.model.segments == [2, 4] and cfg.optim.clip_grad == 1.0
    assert cfg.teacher.pretrained is None


def test_paper_config_is_the_recipe():
    cfg = load_config("configs/digpt/vit_b16_in1k.yaml")
    assert (cfg.model.backbone, cfg.model.patch_size, cfg.model.image_size) == ("base", 16, 224)
    assert (cfg.teacher.arch, cfg.train.epochs, cfg.train.global_batch) == ("ViT-H-14", 300, 4096)
    assert cfg.optim.base_lr == 1.5e-4 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 40
    assert cfg.data.crop_scale == [0.2, 1.0] and cfg.optim.clip_grad is None
    assert load_config("configs/digpt/vit_l16_in1k.yaml").model.backbone == "large"


@pytest.mark.parametrize("override,message", [
    ("train.globl_batch=8", "unknown config key 'train.globl_batch'; did you mean 'train.global_batch'?"),
    ("optimizer.lr=1", "unknown config key 'optimizer.lr'"),
    ("train.global_batch=abc", "config key 'train.global_batch' must be int, got 'abc'"),
    ("model.shared_tap_norm=3", "config key 'model.shared_tap_norm' must be bool"),
    ("runtime.backend=tpu", "config key 'runtime.backend' must be one of"),
    ("train.epochs", "must look like key.sub=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_config_file(capsys):
    assert main(["pretrain", "--config", "nope.yaml"]) == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    ({"data.source": "imagefolder", "data.root": "/no/such/dir"}, "data.root '/no/such/dir' does not exist"),
    ({"model.image_size": 40}, "a 5x5 token grid does not split into 2x2 equal segments"),
    ({"model.image_size": 36}, "model.image_size 36 is not a multiple of model.patch_size 8"),
    ({"train.accum_steps": 3}, "train.global_batch 8 is not divisible by data-parallel size 1 x train.accum_steps 3"),
    ({"model.image_size": 48, "model.patch_size": 12}, "teacher grid: a 6x6 token grid does not split into 4x4"),
])
def test_bad_input_fails_before_training(embedded_root, tmp_path, extra, message):
    if extra.get("model.patch_size") == 12:
        extra["model.segments"] = "[4, 4]"  # student 4x4 grid splits; teacher 48/8 = 6 does not
    result = run_cli(["pretrain", *tiny_overrides(embedded_root, tmp_path / "out", **extra)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_info_reports_backend_and_versions():
    result = run_cli(["info", "--backend", "cpu"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["backend"] == "cpu" and info["process_count"] == 1 and info["process_index"] == 0
    assert info["versions"]["torch"]


def test_info_xla_mesh():
    result = run_cli(["info", "--backend", "xla"], env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["num_devices"] == 4 and info["mesh"] == {"shape": [4, 1], "axes": ["data", "fsdp"]}


def test_bench_prints_throughput(embedded_root, tmp_path):
    result = run_cli(["bench", "--steps", "3", "--warmup", "2", *tiny_overrides(embedded_root, tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images_per_sec"] > 0 and report["ms_per_step"] > 0
    assert report["gflops_per_image"] > 0 and report["mfu"] is None  # no known peak for a CPU
    assert "images/s" in result.stdout


def test_nan_loss_stops_and_keeps_last_good_checkpoint(embedded_root, tmp_path):
    """An absurd learning rate blows the weights up within a couple of steps."""
    out = tmp_path / "out"
    extra = {"optim.base_lr": 1e12, "optim.warmup_epochs": 0, "train.ckpt_every": 1, "train.stop_at_step": 8}
    result = run_cli(["pretrain", *tiny_overrides(embedded_root, out, **extra)])
    assert result.returncode == 3, result.stderr[-2000:]
    import re
    match = re.search(r"loss is (nan|inf|-inf) at step (\d+); stopping\. The last good checkpoint is kept: (\S+)",
                      result.stderr)
    assert match, result.stderr[-2000:]
    bad_step = int(match.group(2))
    saved = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert saved and saved[-1] == f"checkpoint-{bad_step - 1:08d}.pt" == match.group(3).rsplit("/", 1)[1]
    import math
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if r["loss"] is not None)
