"""The CLIP teacher: OpenCLIP's visual tower, its tokens, its input normalisation, its weights."""
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from models.teacher import IMAGENET_MEAN, IMAGENET_STD, ClipTeacher


def normalise(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_tokens_match_open_clip_image_embedding(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model("demo-ViT-T-8", pretrained=None, force_image_size=32).eval()
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), weights)
    teacher = ClipTeacher("demo-ViT-T-8", str(weights), image_size=32)

    pixels = torch.rand(2, 3, 32, 32)
    tokens = teacher(normalise(pixels, IMAGENET_MEAN, IMAGENET_STD))
    assert tokens.shape == (2, 1 + 4 * 4, 64) and teacher.grid == (4, 4) and teacher.dim == 64
    with torch.no_grad():
        expected = clip.encode_image(normalise(pixels, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    assert torch.allclose(tokens[:, 0], expected, atol=1e-5)  # the cls token is CLIP's embedding
    assert not tokens.requires_grad and not teacher.training
    teacher.train()
    assert not teacher.training


def test_vit_h14_grid_at_224():
    teacher = ClipTeacher("ViT-H-14", None, image_size=224)
    assert teacher.grid == (16, 16) and teacher.dim == 1024


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown teacher arch 'ViT-Q-99'"):
        ClipTeacher("ViT-Q-99")
