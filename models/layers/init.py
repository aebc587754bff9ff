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


def xavier_uniform_blocks_(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """Xavier-uniform each of `parts` equal row blocks of `weight` as a matrix of its own: a fused
    Linear (e.g. timm's qkv, (3d, d)) standing in for `parts` separate official Linears gets each
    part's official std, sqrt(2 / (fan_in + out / parts)), not the fused matrix's smaller one."""
    if weight.shape[0] % parts:
        raise ValueError(f"{parts} row blocks do not split a weight of shape {tuple(weight.shape)}")
    with torch.no_grad():
        for block in weight.chunk(parts, dim=0):
            nn.init.xavier_uniform_(block)
    return weight
