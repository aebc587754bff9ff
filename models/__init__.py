"""Model package: backbones, pre-training methods and the CLIP teacher. Never imports torch_xla."""
from . import digpt  # noqa: F401  (registers "digpt")
from .registry import create_method, method_names, register_method
from .teacher import ClipTeacher
from .vit import VIT_SIZES, SegmentViT

__all__ = ["create_method", "method_names", "register_method", "ClipTeacher", "SegmentViT", "VIT_SIZES"]
