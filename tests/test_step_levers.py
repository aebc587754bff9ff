"""The CUDA step's levers that can be checked without a GPU: the additive mask equals the boolean
one, the options are checked before anything is built, loader workers sized to the host. (The
levers on a GPU: tests/test_cuda.py.)"""
import os

import pytest
import torch

from conftest import tiny_overrides
from xla_trainer.config import ConfigError, RuntimeConfig, load_config
from xla_trainer.pretrain import build_models
from xla_trainer.runtime import Runtime, additive_masks, create_runtime


def test_additive_masks_give_the_boolean_masks_loss(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path, **{"runtime.precision": "fp32"}))
    method, teacher, _ = build_models(cfg)
    images = torch.randn(4, 3, 32, 32)
    batch = {"images": images, "targets": teacher(images)}
    noise = torch.rand(4, *method.noise_shape)
    boolean = method.attn_mask.clone()
    expected = method(batch, noise)["loss"]

    additive_masks(method, torch.float32)
    mask = method.attn_mask
    assert mask.dtype == torch.float32 and mask.shape == boolean.shape
    assert mask.stride(-2) % 16 == 0  # rows start aligned: read in place, not copied per call
    assert torch.equal(mask == 0, boolean) and torch.isneginf(mask[~boolean]).all()
    assert method(batch, noise)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_sdpa_backend_is_refused_before_anything_is_built():
    with pytest.raises(ConfigError, match=r"runtime.sdpa_backends \['flash', 'fast'\]: give one or more of"):
        create_runtime("cpu", sdpa_backends=["flash", "fast"])
    with pytest.raises(ConfigError, match="runtime.attention_masks"):
        load_config(None, ["runtime.attention_masks=float"])
    assert RuntimeConfig().fused_optimizer and not RuntimeConfig().tf32  # the exact levers on by default


def test_loader_workers_follow_the_host(monkeypatch):
    runtime = Runtime("fp32")
    cores = len(os.sched_getaffinity(0))
    assert runtime.loader_workers(3) == 3
    assert runtime.loader_workers(-1) == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # every core a process: one worker each
    assert runtime.loader_workers(-1) == 1
    assert not runtime.pin_memory  # page-locked memory only for a GPU
