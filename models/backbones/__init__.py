"""Backbones: each file registers one entry into models.registry.BACKBONES."""
from . import vit  # noqa: F401
