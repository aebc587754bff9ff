"""The CLIP teacher: OpenCLIP's visual tower, its tokens, its input normalisation, its weights."""
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from xla_trainer_models.teachers.openclip import ClipTeacher, OpenClipConfig


def normalise(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_tokens_match_open_clip_image_embedding(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model("demo-ViT-T-8", pretrained=None, force_image_size=32).eval()
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), weights)
    teacher = ClipTeacher(OpenClipConfig(arch="demo-ViT-T-8", pretrained=str(weights)), 32)

    pixels = torch.rand(2, 3, 32, 32)
    tokens = teacher(normalise(pixels, IMAGENET_MEAN, IMAGENET_STD))
    assert tokens.shape == (2, 1 + 4 * 4, 64) and teacher.grid == (4, 4) and teacher.dim == 64
    with torch.no_grad():
        expected = clip.encode_image(normalise(pixels, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    assert torch.allclose(tokens[:, 0], expected, atol=1e-5)  # the cls token is CLIP's embedding
    assert not tokens.requires_grad and not teacher.training
    teacher.train()
    assert not teacher.training


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown teacher arch 'ViT-Q-99'"):
        ClipTeacher(OpenClipConfig(arch="ViT-Q-99"), 224)


def test_timm_teacher_drops_register_tokens_and_renormalises():
    """A DINOv2 with 4 registers: the targets are its cls and patch tokens, computed on the pixels
    in the teacher's own normalisation."""
    from xla_trainer_models.teachers.timm_vit import TimmTeacherConfig, TimmViTTeacher
    torch.manual_seed(0)
    teacher = TimmViTTeacher(TimmTeacherConfig(arch="vit_small_patch14_reg4_dinov2"), 28)
    pixels = torch.rand(2, 3, 28, 28)
    tokens = teacher(normalise(pixels, IMAGENET_MEAN, IMAGENET_STD))
    own = teacher.model.pretrained_cfg
    expected = teacher.model.forward_features(normalise(pixels, own["mean"], own["std"]))
    assert teacher.grid == (2, 2) and tokens.shape == (2, 5, 384)
    assert torch.allclose(tokens, torch.cat([expected[:, :1], expected[:, 5:]], 1), atol=1e-5)


def test_digpt_trains_with_a_timm_teacher(embedded_root, tmp_path):
    from conftest import read_metrics, tiny_overrides
    from xla_trainer.config import load_config
    from xla_trainer.pretrain import pretrain
    cfg = load_config(None, tiny_overrides(embedded_root, tmp_path, **{
        "teacher.name": "timm", "teacher.arch": "vit_tiny_patch16_224", "train.stop_at_step": 2}))
    pretrain(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 8 for r in rows)
