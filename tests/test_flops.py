"""fvcore FLOP counts of the real models against the figures derived in shared/METHODS.md."""
import pytest
import torch

from xla_trainer_models import TargetInfo
from xla_trainer_models.objectives.digpt import DiGPT, DiGPTConfig
from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
from xla_trainer.flops import forward_flops, objective_flops, peak_flops, train_flops_per_image


def test_sdpa_is_counted():
    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x = torch.randn(2, 4, 10, 16)
    assert forward_flops(Sdpa(), x, x, x) == 2 * 2 * (2 * 4 * 10 * 10 * 16)


def test_digpt_vit_b16_student_forward_is_51_gflops():
    torch.manual_seed(0)
    method = DiGPT(DiGPTConfig(), SegmentViT(ViTConfig()), TargetInfo(1024, (16, 16)))
    batch = {"images": torch.zeros(1, 3, 224, 224), "targets": torch.zeros(1, 257, 1024)}
    flops = train_flops_per_image(method, None, batch)
    assert flops["student_forward"] / 1e9 == pytest.approx(51.1, rel=0.02)
    assert flops["train_step"] == 3 * flops["student_forward"]


@pytest.mark.slow
def test_vit_h14_teacher_grid_and_forward_is_335_gflops():
    """OpenCLIP's attention runs as one fused op in eval mode, which fvcore alone does not count."""
    from xla_trainer_models.teachers.openclip import ClipTeacher, OpenClipConfig
    torch.manual_seed(0)
    teacher = ClipTeacher(OpenClipConfig(arch="ViT-H-14"), 224)
    assert teacher.grid == (16, 16) and teacher.dim == 1024
    assert forward_flops(teacher, torch.zeros(1, 3, 224, 224)) / 1e9 == pytest.approx(335.3, rel=0.02)


def test_peak_table():
    assert peak_flops("v5litepod-8") == 197e12 and peak_flops("v4-32") == 275e12
    assert peak_flops("v5p-128") == 459e12 and peak_flops("v6e-8") == 918e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("x86_64") is None


def test_an_objective_can_count_its_own_flops():
    """Where fvcore cannot count (e.g. a scan), the objective's forward_flops(batch) is used."""
    class Scan(torch.nn.Module):
        noise_shape = None

        def forward(self, batch, noise):
            return {"loss": torch.cumsum(batch["images"], 0).sum()}

        def forward_flops(self, batch):
            return 7.0 * batch["images"].numel()

    batch = {"images": torch.zeros(1, 3, 4, 4)}
    assert objective_flops(Scan(), batch) == 7.0 * 48
    assert train_flops_per_image(Scan(), None, batch)["train_step"] == 3 * 7.0 * 48
