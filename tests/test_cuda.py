"""The CUDA backend on a real GPU (gpu_scripts/device_check.sh runs these on the lent GPU machine):
training on one GPU against the CPU, bf16 numerics, the compiled step against eager, and a
checkpoint saved on cuda resumed on cpu. Tiny D-iGPT configs (conftest.tiny_overrides), in-process.

The trainer draws each step's noise (D-iGPT's segment order) on the device, and CUDA's generator
gives other numbers than the CPU's for the same seed; where a cuda run is compared with a cpu run,
both draw it on the host (`host_noise`), so that they see the same orders and differ only by the
device's arithmetic."""
import copy
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_overrides
from xla_trainer.config import load_config
from xla_trainer.loop import make_runtime
from xla_trainer.pretrain import build_models, pretrain
from xla_trainer.runtime import Runtime, create_runtime

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (torch.cuda.is_available() is False)")]

STEPS = 6
TRAINED = {}


@pytest.fixture
def host_noise(monkeypatch):
    original = Runtime.step_noise

    def on_host(self, *args):
        device, self.device = self.device, torch.device("cpu")
        try:
            noise = original(self, *args)
        finally:
            self.device = device
        return noise.to(device)
    monkeypatch.setattr(Runtime, "step_noise", on_host)


def train(data_root, out, backend: str, **extra) -> list[dict]:
    """A tiny D-iGPT pretrain run in this process (fp32 unless told), its metrics rows; the
    result of pretrain() in TRAINED[out]."""
    values = {"runtime.backend": backend, "runtime.precision": "fp32", "train.stop_at_step": STEPS, **extra}
    cfg = load_config(None, tiny_overrides(data_root, out, **values))
    runtime = make_runtime(cfg)  # every runtime.* key: the CUDA step's levers as configured
    assert runtime.backend == backend and runtime.device.type == backend
    TRAINED[out] = pretrain(cfg, runtime)
    return read_metrics(out)


def assert_close(rows, reference, rel, keys=("loss", "grad_norm")):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(reference, rows):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)


def test_one_gpu_trains_like_the_cpu(embedded_root, tmp_path, host_noise):
    """The cuda runtime in one process (no torchrun, so no process group and no DDP wrapper: one
    device) trains: finite losses that fall, equal to the CPU's within TF32-level differences."""
    gpu = train(embedded_root, tmp_path / "cuda", "cuda")
    cpu = train(embedded_root, tmp_path / "cpu", "cpu")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in gpu)
    assert gpu[-1]["loss"] < gpu[0]["loss"]
    assert_close(gpu, cpu, rel=2e-2)


def test_bf16_loss_matches_fp32_cpu(embedded_root, tmp_path):
    """The same weights, batch and noise: the loss under cuda bf16 autocast within 3% of the fp32
    CPU loss, and the bf16 teacher's targets pointing the same way as the fp32 ones."""
    cfg = load_config(None, tiny_overrides(embedded_root, tmp_path))
    method, teacher, _ = build_models(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, cfg.backbone.image_size, cfg.backbone.image_size, generator=g)
    noise = torch.rand(8, *method.noise_shape, generator=g)
    with torch.no_grad():
        targets = teacher(images)
        expected = method({"images": images, "targets": targets}, noise)
    runtime = create_runtime("cuda", "bf16")
    gpu_method, gpu_teacher = copy.deepcopy(method).to(runtime.device), copy.deepcopy(teacher)
    gpu_teacher.cast_weights(torch.bfloat16)
    gpu_teacher = gpu_teacher.to(runtime.device)
    with torch.no_grad(), runtime.autocast():
        gpu_targets = gpu_teacher(images.to(runtime.device)).float()
        got = gpu_method({"images": images.to(runtime.device), "targets": targets.to(runtime.device)},
                         noise.to(runtime.device))
    cos = torch.nn.functional.cosine_similarity(gpu_targets.cpu(), targets, dim=-1)
    assert cos.min() > 0.98, cos.min()
    for key in ("loss", "loss_ar", "loss_kd"):
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=3e-2), key


def test_compiled_step_matches_eager(embedded_root, tmp_path):
    """runtime.torch_compile=true against false: the same seed, batches and (cuda) noise."""
    eager = train(embedded_root, tmp_path / "eager", "cuda", **{"train.stop_at_step": 4})
    compiled = train(embedded_root, tmp_path / "compiled", "cuda",
                     **{"train.stop_at_step": 4, "runtime.torch_compile": "true"})
    assert_close(compiled, eager, rel=1e-2)


def test_checkpoint_saved_on_cuda_resumes_on_cpu(embedded_root, tmp_path, host_noise, caplog):
    """Steps 1-3 on cuda (checkpoint at 3), then the same output_dir on cpu to step 6: it resumes at
    step 3 and ends as an uninterrupted cpu run does."""
    out = tmp_path / "moved"
    first = train(embedded_root, out, "cuda", **{"train.stop_at_step": 3, "train.ckpt_every": 3})
    saved = TRAINED[out]
    assert [r["step"] for r in first] == [1, 2, 3] and saved["steps"] == 3 and Path(saved["checkpoint"]).exists()
    caplog.set_level("INFO", logger="xla_trainer.loop")
    moved = train(embedded_root, out, "cpu")
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    uninterrupted = train(embedded_root, tmp_path / "cpu", "cpu")
    assert [r["step"] for r in moved] == list(range(1, STEPS + 1)) and TRAINED[out]["steps"] == STEPS
    assert_close(moved, uninterrupted, rel=2e-2, keys=("loss", "grad_norm", "lr"))
