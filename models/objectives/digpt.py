"""D-iGPT (arXiv 2312.02147): the encoder sees the first S-1 segments of a random segment order
under a block-causal mask; an "ar" decoder predicts the teacher's features of the next segment, a
"kd" decoder those of the visible segment, and both predict the teacher's cls token.

The mask (encoder, decoder self- and cross-attention alike) is block-causal over the visible
segments with cls last, seeing everything. `cls_visible_to_last_segment` chooses who sees cls: the
official code lets the last visible segment see it (a side effect of padding its mask); the clean
form (False) lets no segment see it. Letting every segment see cls is not a clean alternative but
a leak: cls attends to all visible segments, so an AR query for segment k+1 would read segment
k+1's own pixels through it, and early segments would see later ones from the second layer on;
both forms offered keep the block-causal order (a segment learns nothing of later ones)."""
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.segments import SegmentLayout, block_causal_mask, segment_order
from ..registry import OBJECTIVES, Objective, TargetInfo
from .digpt_decoder import DecoderBlock, FeaturePredictor


def default_taps(depth: int) -> tuple[int, ...]:
    """Blocks 6, 8, 10, 12 of a 12-block encoder; the same fractions of any depth."""
    return tuple(sorted({max(1, round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6, 1)}))


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 2 - 2 cos, computed in float32."""
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (2 - 2 * (pred * target).sum(-1)).mean()


def linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in): the weights F.interpolate(mode="linear", align_corners=False) gives
    each input position; a bilinear resize is this matrix along each axis."""
    impulses = torch.eye(size_in, dtype=torch.float64)[None]  # one channel per input position
    return F.interpolate(impulses, size=size_out, mode="linear", align_corners=False)[0].T.float()


@dataclass
class DiGPTConfig:
    name: str = "digpt"
    segments: list = field(default_factory=lambda: [2, 2])  # segment rows, cols
    taps: Optional[list] = None  # encoder blocks fed to the decoders; null = 6,8,10,12 of 12
    decoder_width: int = 1024
    decoder_depth: int = 2
    decoder_heads: int = 32
    shared_tap_norm: bool = True  # official: one LayerNorm shared by the taps
    # True: the official mask (its reflect padding lets the last visible segment see cls, harmless:
    # that segment sees every segment anyway). False: the clean form, no segment sees cls (cls,
    # last, still sees all). Not "every segment sees cls": cls has seen all segments, so that would
    # leak later segments into earlier ones, AR targets included (models/layers/segments.py).
    cls_visible_to_last_segment: bool = True
    BOUNDS: ClassVar[dict] = {"segments": ">= 1 pair", "taps": ">= 1", "decoder_width": ">= 1",
                              "decoder_depth": ">= 1", "decoder_heads": ">= 1"}


class DiGPT(nn.Module):
    # (name, first segment slot queried): "ar" predicts slots 1..S-1, "kd" slots 0..S-2.
    DECODERS = (("ar", 1), ("kd", 0))
    own_blocks = (DecoderBlock,)  # FSDP wraps these one by one, besides the encoder's blocks

    def __init__(self, cfg: DiGPTConfig, encoder: nn.Module, targets: TargetInfo):
        super().__init__()
        self.encoder = encoder
        self.layout = SegmentLayout(encoder.grid, tuple(cfg.segments))
        try:
            self.teacher_layout = SegmentLayout(tuple(targets.grid), tuple(cfg.segments))
        except ValueError as e:
            raise ValueError(f"teacher grid: {e}") from None
        self.taps = tuple(cfg.taps) if cfg.taps else default_taps(encoder.depth)
        if max(self.taps) > encoder.depth or min(self.taps) < 1:
            raise ValueError(f"objective.taps {self.taps} must lie in 1..{encoder.depth} (the encoder's depth)")
        S, T = self.layout.num_segments, self.layout.tokens_per_segment
        self.register_buffer("patch_index", self.layout.patch_index(), persistent=False)
        self.register_buffer("teacher_index", self.teacher_layout.patch_index() + 1, persistent=False)
        self.register_buffer("attn_mask", block_causal_mask(S - 1, T, cfg.cls_visible_to_last_segment),
                             persistent=False)
        # a student segment is resized to the teacher's by two matmuls: F.interpolate's bilinear
        # backward has no XLA lowering off TPU, and ran on the host, cutting the step's graph
        (h, w), (th, tw) = self.layout.segment_shape, self.teacher_layout.segment_shape
        self.register_buffer("resize_rows", linear_resize_matrix(h, th), persistent=False)
        self.register_buffer("resize_cols", linear_resize_matrix(w, tw), persistent=False)
        # a causal-only student (a scan) takes the segments in order, causal inside each one, no mask
        self.causal_encoder = getattr(encoder, "causal_only", False)
        self.decoders = nn.ModuleDict({
            name: FeaturePredictor(encoder.embed_dim, len(self.taps), encoder.grid, cfg.decoder_width,
                                   cfg.decoder_depth, cfg.decoder_heads, targets.dim, cfg.shared_tap_norm)
            for name, _ in self.DECODERS})

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Per-sample uniform noise the trainer draws on the device: one value per segment."""
        return (self.layout.num_segments,)

    def forward(self, batch: dict, noise: torch.Tensor) -> dict:
        """batch["images"] (B, 3, H, W); batch["targets"]: teacher tokens (B, 1 + Gh*Gw, C), cls
        first; noise (B, S). Returns {"loss", "loss_ar", "loss_kd"}."""
        images, targets = batch["images"], batch["targets"]
        order = segment_order(noise)
        S = self.layout.num_segments
        seg_patches = self.patch_index[order]  # (B, S, T)
        taps = self.encoder.forward_taps(images, seg_patches[:, :-1].flatten(1),
                                         None if self.causal_encoder else self.attn_mask, self.taps)
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
        if (h, w) != (th, tw):  # bilinear, in float32 as F.interpolate was
            with torch.autocast(patches.device.type, enabled=False):
                patches = self.resize_rows @ patches.float() @ self.resize_cols.T
        patches = patches.flatten(2).transpose(1, 2).reshape(B, n * th * tw, -1)
        target_index = self.teacher_index[slots].flatten(1)  # (B, n * th * tw)
        patch_targets = torch.gather(targets, 1, target_index[..., None].expand(-1, -1, targets.shape[-1]))
        pred_all = torch.cat([patches, pred[:, -1:].to(patches.dtype)], dim=1)
        target_all = torch.cat([patch_targets, targets[:, :1]], dim=1)
        return cosine_distance(pred_all, target_all)


@OBJECTIVES.register("digpt")
class DiGPTObjective(Objective):
    Config = DiGPTConfig
    needs_teacher = True
    mask = "block-causal"
    causal_student = True  # its tokens are in segment order already

    @staticmethod
    def check(cfg: DiGPTConfig, grid: tuple[int, int]):
        if cfg.decoder_width % cfg.decoder_heads:
            raise ValueError(f"objective.decoder_heads {cfg.decoder_heads} does not divide objective.decoder_width "
                             f"{cfg.decoder_width}")
        if len(cfg.segments) != 2:
            raise ValueError(f"objective.segments must be [rows, cols], got {cfg.segments}")
        try:
            SegmentLayout(tuple(grid), tuple(cfg.segments))
        except ValueError as e:
            raise ValueError(f"objective.segments: {e}") from None

    @staticmethod
    def build(cfg: DiGPTConfig, student: nn.Module, targets: TargetInfo) -> DiGPT:
        return DiGPT(cfg, student, targets)
