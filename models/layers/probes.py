"""Heads on a backbone's classifier (any backbone: they use timm's forward_features /
forward_head): the linear and attentive probes over a frozen one, and the classification loss of
a classifier trained whole (fine-tuning, supervised training)."""
import torch
import torch.nn.functional as F
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
    """AIM's attentive probe, which XTRA uses: BatchNorm without affine over every token, one
    learned query (not projected) attending to them with `heads` heads through bias-free key and
    value projections (no output projection), then a linear layer."""
    takes_tokens = True

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive probe: {heads} heads do not divide the width {dim}")
        self.heads = heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        k, v = self.k(tokens), self.v(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1).to(k.dtype)  # under autocast, as k and v
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, dim / heads)
        return self.head(pooled.transpose(1, 2).flatten(2)[:, 0])


class FrozenEncoderProbe(nn.Module):
    """A probe trained on a frozen encoder, which stays in eval mode and outside autograd;
    `blocks`: see probe_features."""

    def __init__(self, encoder: nn.Module, probe: nn.Module, blocks: int | None = None):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.probe = probe
        self.blocks = blocks

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = probe_features(self.encoder, images, self.probe.takes_tokens, self.blocks)
        return self.probe(features.float())


def probe_features(encoder: nn.Module, images: torch.Tensor, tokens: bool, blocks: int | None = None) -> torch.Tensor:
    """Tokens (B, N, C) or pooled features (B, C) of a classifier. blocks=None: its final ones
    (forward_features, and for timm's ViT fc_norm of the mean patch token); blocks=n: the mean of
    the outputs of its last n blocks before the final norm (AIM / XTRA), mean-pooled over the
    patch tokens (timm's forward_intermediates)."""
    if blocks is None:
        x = encoder.forward_features(images)
        return x if tokens else encoder.forward_head(x, pre_logits=True)
    outs = encoder.forward_intermediates(images, indices=blocks, norm=False, output_fmt="NLC",
                                         intermediates_only=True)
    x = torch.stack(outs).mean(0)
    return x if tokens else x.mean(1)


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
