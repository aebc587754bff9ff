"""The student encoder: timm's VisionTransformer run over a chosen subset of patch tokens in a
chosen order, with an attention mask, returning the outputs of selected blocks.

Subclassing timm keeps the state_dict in timm's layout: for timm's standard cls-first ViT
(`timm.create_model('vit_base_patch16_224', ...)`), models.convert.encoder_to_timm only drops the
decoder keys and gives pos_embed its zero cls row.
"""
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .pos_embed import sincos_2d

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
        (N+1, N+1); return the outputs of blocks `taps` (1-based)."""
        x = self.patch_embed(images) + self.pos_embed  # every token keeps its true 2-D position
        x = torch.gather(x, 1, token_index[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        outs = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, attn_mask=attn_mask)
            if i in taps:
                outs.append(x)
        return outs
