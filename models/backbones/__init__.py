"""Backbones: each file registers one entry into models.registry.BACKBONES."""
from . import adventurer, crate_alpha, vit  # noqa: F401
