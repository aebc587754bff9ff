"""Model package: backbones/, objectives/ and teachers/ register into the three registries of
registry.py; layers/ holds what they share. Never imports torch_xla."""
from . import backbones, objectives, teachers  # noqa: F401  (register the built-in entries)
from .registry import BACKBONES, MASKS, OBJECTIVES, TEACHERS, TargetInfo, check_pairing

__all__ = ["BACKBONES", "MASKS", "OBJECTIVES", "TEACHERS", "TargetInfo", "check_pairing"]
