"""Heads on a backbone's classifier (any backbone: they use timm's forward_features /
forward_head): the linear and attentive probes over a frozen one, and the classification loss of
a classifier trained whole (fine-tuning, supervised training)."""
import torch
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from torch import nn


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

    def __init__(self, encoder: nn.Module, probe: nn.Module):
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


def pooled_or_tokens(encoder: nn.Module, images: torch.Tensor, tokens: bool) -> torch.Tensor:
    """The encoder's final tokens (B, N, C), or its pooled features (B, C) (for timm's ViT:
    fc_norm of the mean patch token)."""
    x = encoder.forward_features(images)
    return x if tokens else encoder.forward_head(x, pre_logits=True)


class Classification(nn.Module):
    """A classifier as the trainer's objective: cross-entropy on soft targets (mixup, label
    smoothing) over batch {"images", "targets"}; it draws no noise."""
    noise_shape = None

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.criterion = SoftTargetCrossEntropy()

    def forward(self, batch: dict, noise=None) -> dict:
        logits = self.classifier(batch["images"])
        return {"loss": self.criterion(logits.float(), batch["targets"])}
