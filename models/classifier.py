"""Downstream models around a pre-trained encoder: the fine-tuning ViT, and the linear and
attentive probes over a frozen one.

The encoder is timm's VisionTransformer in the MAE / D-iGPT fine-tuning layout (cls first, global
average pool of the patch tokens, fc_norm, head), so a pre-trained SegmentViT, an official D-iGPT
checkpoint and a timm export all load into the same module (models/convert.py)."""
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .vit import vit_dims


def vit_classifier(size: str = "base", img_size: int = 224, patch_size: int = 16, num_classes: int = 0,
                   drop_path: float = 0.0, width: int | None = None, depth: int | None = None,
                   heads: int | None = None) -> VisionTransformer:
    width, depth, heads = vit_dims(size, width, depth, heads)
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=num_classes, global_pool="avg",
        fc_norm=True, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
        qkv_bias=True, class_token=True, drop_path_rate=drop_path,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))


class LinearProbe(nn.Module):
    """BatchNorm without affine, then a linear layer, on the pooled features (MAE's probe)."""
    takes_tokens = False

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(pooled))


class AttentiveProbe(nn.Module):
    """The AIM / XTRA attentive probe: BatchNorm without affine over every token, one learned
    query attending to them with multi-head cross-attention, a linear layer."""
    takes_tokens = True

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive probe: {heads} heads do not divide the width {dim}")
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.query, std=0.02)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return self.head(pooled[:, 0])


class FrozenEncoderProbe(nn.Module):
    """A probe trained on a frozen encoder, which stays in eval mode and outside autograd."""
    fsdp_blocks = (Block,)

    def __init__(self, encoder: VisionTransformer, probe: nn.Module):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.probe = probe

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = pooled_or_tokens(self.encoder, images, self.probe.takes_tokens)
        return self.probe(features.float())


def pooled_or_tokens(encoder: VisionTransformer, images: torch.Tensor, tokens: bool) -> torch.Tensor:
    """The encoder's final tokens (B, 1 + N, C), or its pooled features: fc_norm of the mean
    patch token (B, C)."""
    x = encoder.forward_features(images)
    return x if tokens else encoder.forward_head(x, pre_logits=True)
