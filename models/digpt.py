"""D-iGPT (arXiv 2312.02147): the encoder sees the first S-1 segments of a random segment order
under a block-causal mask; an "ar" decoder predicts the teacher's features of the next segment, a
"kd" decoder those of the visible segment, and both predict the teacher's cls token."""
import torch
import torch.nn.functional as F
from torch import nn

from timm.models.vision_transformer import Block

from .decoder import DecoderBlock, FeaturePredictor
from .registry import register_method
from .segments import SegmentLayout, block_causal_mask, segment_order
from .vit import SegmentViT


def default_taps(depth: int) -> tuple[int, ...]:
    """Blocks 6, 8, 10, 12 of a 12-block encoder; the same fractions of any depth."""
    return tuple(sorted({max(1, round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6, 1)}))


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 2 - 2 cos, computed in float32."""
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (2 - 2 * (pred * target).sum(-1)).mean()


class DiGPT(nn.Module):
    # (name, first segment slot queried): "ar" predicts slots 1..S-1, "kd" slots 0..S-2.
    DECODERS = (("ar", 1), ("kd", 0))
    fsdp_blocks = (Block, DecoderBlock)  # the units FSDP shards and gathers one at a time

    def __init__(self, encoder: SegmentViT, teacher_dim: int, teacher_grid: tuple[int, int],
                 segments=(2, 2), taps=None, decoder_width=1024, decoder_depth=2,
                 decoder_heads=32, shared_tap_norm=True, cls_visible_to_last_segment=True):
        super().__init__()
        self.encoder = encoder
        self.layout = SegmentLayout(encoder.grid, tuple(segments))
        try:
            self.teacher_layout = SegmentLayout(tuple(teacher_grid), tuple(segments))
        except ValueError as e:
            raise ValueError(f"teacher grid: {e}") from None
        self.taps = tuple(taps) if taps else default_taps(len(encoder.blocks))
        if max(self.taps) > len(encoder.blocks) or min(self.taps) < 1:
            raise ValueError(f"taps {self.taps} must lie in 1..{len(encoder.blocks)} (encoder depth)")
        S, T = self.layout.num_segments, self.layout.tokens_per_segment
        self.register_buffer("patch_index", self.layout.patch_index(), persistent=False)
        self.register_buffer("teacher_index", self.teacher_layout.patch_index() + 1, persistent=False)
        self.register_buffer("attn_mask", block_causal_mask(S - 1, T, cls_visible_to_last_segment),
                             persistent=False)
        self.decoders = nn.ModuleDict({
            name: FeaturePredictor(encoder.embed_dim, len(self.taps), encoder.grid, decoder_width,
                                   decoder_depth, decoder_heads, teacher_dim, shared_tap_norm)
            for name, _ in self.DECODERS})

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Per-sample uniform noise the trainer draws on the device: one value per segment."""
        return (self.layout.num_segments,)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> dict:
        """images (B, 3, H, W); targets: teacher tokens (B, 1 + Gh*Gw, C), cls first; noise (B, S).
        Returns {"loss", "loss_ar", "loss_kd"}."""
        order = segment_order(noise)
        S = self.layout.num_segments
        seg_patches = self.patch_index[order]  # (B, S, T)
        taps = self.encoder.forward_taps(images, seg_patches[:, :-1].flatten(1), self.attn_mask,
                                         self.taps)
        losses = {}
        for name, first in self.DECODERS:
            slots = order[:, first:first + S - 1]
            pred = self.decoders[name](taps, self.patch_index[slots].flatten(1), self.attn_mask)
            losses[f"loss_{name}"] = self._loss(pred, targets, slots)
        losses["loss"] = sum(losses.values())
        return losses

    def _loss(self, pred: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Resize each predicted segment to the teacher's segment grid (bilinear), then the cosine
        distance over all segment tokens and the cls token together."""
        B, n = slots.shape
        h, w = self.layout.segment_shape
        th, tw = self.teacher_layout.segment_shape
        patches = pred[:, :-1].unflatten(1, (n, h, w)).flatten(0, 1).permute(0, 3, 1, 2)
        if (h, w) != (th, tw):
            patches = F.interpolate(patches.float(), size=(th, tw), mode="bilinear", align_corners=False)
        patches = patches.flatten(2).transpose(1, 2).reshape(B, n * th * tw, -1)
        target_index = self.teacher_index[slots].flatten(1)  # (B, n * th * tw)
        patch_targets = torch.gather(targets, 1, target_index[..., None].expand(-1, -1, targets.shape[-1]))
        pred_all = torch.cat([patches, pred[:, -1:].to(patches.dtype)], dim=1)
        target_all = torch.cat([patch_targets, targets[:, :1]], dim=1)
        return cosine_distance(pred_all, target_all)


@register_method("digpt")
def digpt(*, backbone="base", image_size=224, patch_size=16, width=None, depth=None, heads=None,
          teacher_dim, teacher_grid, **kwargs) -> DiGPT:
    encoder = SegmentViT(backbone, image_size, patch_size, width=width, depth=depth, heads=heads)
    return DiGPT(encoder, teacher_dim, teacher_grid, **kwargs)
