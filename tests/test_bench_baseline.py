"""`bench --baseline official`: the official-style step beside ours, its float mask and CPU
randperm orders, and what it refuses. All in-process on the tiny D-iGPT: a few seconds."""
import json
import math
import re

import pytest
import torch
from conftest import tiny_overrides

from xla_trainer import bench as bench_module
from xla_trainer import bench_official
from xla_trainer.bench_official import official_style_bench, randperm_noise
from xla_trainer.cli import main
from xla_trainer.config import ConfigError, load_config
from xla_trainer.pretrain import build_models
from xla_trainer.runtime import Runtime, additive_mask, create_runtime


def tiny_config(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path, tmp_path / "out", **extra))


@pytest.mark.slow  # a subprocess or a whole training: not in the edit loop
def test_cli_prints_both_rates_and_their_ratio(tmp_path, capsys):
    assert main(["bench", "--baseline", "official", "--steps", "2", "--warmup", "1",
                 *tiny_overrides(tmp_path, tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["baseline"] == "official" and report["baseline_images_per_sec"] > 0
    assert report["speedup_vs_baseline"] == pytest.approx(report["images_per_sec"] / report["baseline_images_per_sec"])
    line = re.search(r"baseline official: ([\d.]+) images/s, [\d.]+ ms/step; ours ([\d.]+) images/s: ([\d.]+)x", out)
    assert line, out
    theirs, ours, ratio = map(float, line.groups())
    assert (theirs, ours) == (round(report["baseline_images_per_sec"], 1), round(report["images_per_sec"], 1))
    assert ratio == round(report["speedup_vs_baseline"], 2)


def test_baseline_step_trains_on_a_fixed_batch(tmp_path):
    result = official_style_bench(tiny_config(tmp_path, **{"optim.lr": 3e-3}), create_runtime("cpu"),
                                  steps=8, warmup=0)
    losses = result["losses"]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.3, losses  # measured: 3.94 -> 3.14
    assert result["images_per_sec"] > 0 and result["ms_per_step"] > 0


def test_float_mask_means_what_the_boolean_mask_means(tmp_path):
    method, _, info = build_models(tiny_config(tmp_path))
    allowed = method.attn_mask
    mask = additive_mask(allowed)  # the baseline's per-step float mask
    assert mask.dtype == torch.float32 and mask.shape == allowed.shape
    assert torch.equal(mask, torch.where(allowed, 0.0, float("-inf")))
    # the same model under either form: the same loss
    targets = torch.randn(2, 1 + info.grid[0] * info.grid[1], info.dim)
    batch = {"images": torch.randn(2, 3, 32, 32), "targets": targets}
    noise = torch.rand(2, *method.noise_shape)
    with torch.no_grad():
        boolean = method(batch, noise)["loss"]
        method.attn_mask = mask
        additive = method(batch, noise)["loss"]
    assert additive == pytest.approx(boolean.item(), rel=1e-5)


def test_randperm_noise_sorts_into_each_samples_randperm():
    noise = randperm_noise(6, (4,), torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    assert noise.shape == (6, 4)
    orders = noise.argsort(-1)
    assert torch.equal(orders, torch.stack([torch.randperm(4, generator=replay) for _ in range(6)]))
    assert torch.equal(orders.sort(-1).values, torch.arange(4).expand(6, 4))  # each a permutation


def test_xla_backend_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    xla = Runtime()
    xla.backend = "xla"

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(bench_module, "build_job", no_model)
    monkeypatch.setattr(bench_official, "build_models", no_model)
    cfg = tiny_config(tmp_path)
    for run in (lambda: bench_module.bench(cfg, baseline="official", runtime=xla),
                lambda: official_style_bench(cfg, xla, steps=1, warmup=0)):
        with pytest.raises(ConfigError, match="runtime.backend=cuda or cpu"):
            run()
