"""Pre-training objectives: each file registers one entry into models.registry.OBJECTIVES."""
from . import digpt, saim, xtra  # noqa: F401
