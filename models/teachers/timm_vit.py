"""A timm ViT as the teacher, e.g. DINOv2 (`vit_base_patch14_dinov2`, `vit_large_patch14_reg4_dinov2`):
frozen, in eval mode, returning its final tokens after the final norm, cls first, then the patch
grid (register tokens dropped): the same targets interface as the OpenCLIP teacher."""
import os
from dataclasses import dataclass
from typing import Optional

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from ..registry import TEACHERS, Teacher
from .frozen import FrozenTeacher
from .openclip import resolve_weights

TIMM_WEIGHTS = "timm"  # teacher.pretrained: timm's own weights for the arch (timm downloads them)


@dataclass
class TimmTeacherConfig:
    name: str = "timm"
    arch: str = "vit_base_patch14_dinov2"  # a timm ViT with a cls token
    pretrained: Optional[str] = None  # null = random init; "timm" = timm's weights; or a local file / gs:// URL
    cache_dir: str = "~/.cache/xla-trainer/teachers"


class TimmViTTeacher(FrozenTeacher):
    def __init__(self, cfg: TimmTeacherConfig, image_size: int):
        super().__init__()
        if cfg.arch not in timm.list_models(pretrained=False):
            raise ValueError(f"unknown timm teacher arch {cfg.arch!r}; see timm.list_models()")
        file = (None if cfg.pretrained in (None, TIMM_WEIGHTS)
                else resolve_weights(cfg.pretrained, os.path.expanduser(cfg.cache_dir)))
        overlay = dict(file=file) if file else None
        self.model = timm.create_model(cfg.arch, pretrained=cfg.pretrained is not None, img_size=image_size,
                                       num_classes=0, pretrained_cfg_overlay=overlay)
        if getattr(self.model, "cls_token", None) is None or not hasattr(self.model, "patch_embed"):
            raise ValueError(f"teacher {cfg.arch!r}: only timm ViTs with a cls token are supported")
        own = self.model.pretrained_cfg
        self.freeze(own.get("mean", IMAGENET_MEAN), own.get("std", IMAGENET_STD))

    def cast_weights(self, dtype: torch.dtype):
        self.model.to(dtype)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def dim(self) -> int:
        return self.model.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) student-normalised -> (B, 1 + Gh*Gw, dim) tokens, cls first."""
        x = self.model.forward_features(self.renormalise(images))
        return torch.cat([x[:, :1], x[:, self.model.num_prefix_tokens:]], dim=1)


@TEACHERS.register("timm")
class TimmTeacher(Teacher):
    Config = TimmTeacherConfig

    @staticmethod
    def build(cfg: TimmTeacherConfig, image_size: int) -> TimmViTTeacher:
        return TimmViTTeacher(cfg, image_size)
