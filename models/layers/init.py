"""Weight init that several models share."""
from typing import Callable

import torch
from torch import nn


def init_linears(module: nn.Module, init_weight: Callable[[torch.Tensor], object]):
    """`init_weight` on every Linear weight of `module` (in module order), zero Linear biases,
    LayerNorms back to ones and zeros."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_weight(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
