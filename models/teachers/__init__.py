"""Teachers that make an objective's targets: each file registers one entry into
models.registry.TEACHERS."""
from . import openclip, timm_vit  # noqa: F401
