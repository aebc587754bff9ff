"""The ViT backbone: as a student, timm's VisionTransformer run over a chosen subset of patch
tokens in a chosen order, with an attention mask, returning the outputs of selected blocks; as a
classifier, timm's VisionTransformer in the MAE / D-iGPT fine-tuning layout (cls first, global
average pool of the patch tokens, fc_norm, head).

Subclassing timm keeps the student's state_dict in timm's layout: for timm's standard cls-first
ViT (`timm.create_model('vit_base_patch16_224', ...)`), vit_timm.encoder_to_timm only drops the
other keys and gives pos_embed its zero cls row, so a pre-trained student, an official D-iGPT
checkpoint and a timm export all load into the same classifier.
"""
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Optional

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..layers.pos_embed import sincos_2d
from ..registry import BACKBONES, MASKS, Backbone
from .vit_timm import encoder_to_timm

# (width, depth, heads) of the standard ViT sizes.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def vit_dims(size: str, width: int | None = None, depth: int | None = None,
             heads: int | None = None) -> tuple[int, int, int]:
    """(width, depth, heads) of a standard size, each overridable."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    w, d, h = VIT_SIZES[size]
    return width or w, depth or d, heads or h


class SegmentViT(VisionTransformer):
    """ViT with fixed 2-D sin-cos positions, a zero-initialised cls token appended LAST, no final
    norm, xavier-uniform Linear init (the MAE / D-iGPT recipe)."""
    extra_tokens = 1  # the cls token, after the patch tokens

    def __init__(self, size: str = "base", img_size: int = 224, patch_size: int = 16,
                 width: int | None = None, depth: int | None = None, heads: int | None = None):
        width, depth, heads = vit_dims(size, width, depth, heads)
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
            num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=True,
            no_embed_class=True, global_pool="token", num_classes=0, final_norm=False,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.pos_embed.requires_grad_(False)
        self._init_d_igpt_weights()

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _init_d_igpt_weights(self):
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.grid, self.embed_dim)[None])
            nn.init.zeros_(self.cls_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))

    def forward_taps(self, images: torch.Tensor, token_index: torch.Tensor, attn_mask: torch.Tensor,
                     taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Encode the patches `token_index` (B, N) in that order, plus cls last, under `attn_mask`
        (N+1, N+1) or None (full attention); return the outputs of blocks `taps` (1-based)."""
        x = self.patch_embed(images) + self.pos_embed  # every token keeps its true 2-D position
        x = torch.gather(x, 1, token_index[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        outs = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, attn_mask=attn_mask)
            if i in taps:
                outs.append(x)
        return outs


def vit_classifier(size: str = "base", img_size: int = 224, patch_size: int = 16, num_classes: int = 0,
                   drop_path: float = 0.0, width: int | None = None, depth: int | None = None,
                   heads: int | None = None) -> VisionTransformer:
    width, depth, heads = vit_dims(size, width, depth, heads)
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=num_classes, global_pool="avg",
        fc_norm=True, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
        qkv_bias=True, class_token=True, drop_path_rate=drop_path,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))


@dataclass
class ViTConfig:
    name: str = "vit"
    size: str = "base"  # tiny | small | base | large | huge
    image_size: int = 224
    patch_size: int = 16
    width: Optional[int] = None  # override the size's width / depth / heads
    depth: Optional[int] = None
    heads: Optional[int] = None
    drop_path: float = 0.0  # the classifier's (fine-tuning, supervised training); students have none
    CHOICES: ClassVar[dict] = {"size": tuple(VIT_SIZES)}


@BACKBONES.register("vit")
class ViT(Backbone):
    Config = ViTConfig
    TINY = {"size": "tiny", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}
    INVALID = {"patch_size": 5}
    masks = MASKS  # any boolean mask goes to timm's attention as it is
    blocks = (Block,)

    @staticmethod
    def check(cfg: ViTConfig):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"backbone.image_size {cfg.image_size} is not a multiple of "
                             f"backbone.patch_size {cfg.patch_size}")

    @staticmethod
    def student(cfg: ViTConfig) -> SegmentViT:
        return SegmentViT(cfg.size, cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads)

    @staticmethod
    def classifier(cfg: ViTConfig, num_classes: int = 0) -> VisionTransformer:
        return vit_classifier(cfg.size, cfg.image_size, cfg.patch_size, num_classes, cfg.drop_path,
                              cfg.width, cfg.depth, cfg.heads)

    import_state = staticmethod(encoder_to_timm)

    @staticmethod
    def adapt_state(state: dict, classifier: VisionTransformer) -> dict:
        if state["pos_embed"].shape != classifier.pos_embed.shape:  # another resolution: resample
            state = {**state, "pos_embed": resample_abs_pos_embed(
                state["pos_embed"], list(classifier.patch_embed.grid_size), num_prefix_tokens=1)}
        return state
