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
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..layers.attention_maps import query_attention
from ..layers.init import init_linears
from ..layers.pos_embed import sincos_2d
from ..layers.segments import block_layout, raster_block_causal_mask
from ..layers.taps import block_outputs, gather_tokens
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


def _init_xavier(model: VisionTransformer):
    """MAE / D-iGPT: xavier-uniform Linear and patch conv (as a matrix), zero biases and cls.
    The fused qkv (3d x d) is one xavier matrix, as in the official MAE and D-iGPT code (timm-style
    fused qkv there too); SAIM, whose official q / k / v are separate, re-initialises it per third."""
    init_linears(model, nn.init.xavier_uniform_)
    proj = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    if model.cls_token is not None:
        nn.init.zeros_(model.cls_token)


def _init_trunc_normal(model: VisionTransformer):
    """XTRA: Linear ~ N(0, 0.02) (truncated at +-2, i.e. not at all), kaiming-normal patch conv
    (fan in, relu gain), zero biases."""
    init_linears(model, partial(trunc_normal_, std=0.02))
    nn.init.kaiming_normal_(model.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(model.patch_embed.proj.bias)


INITS = {"xavier": _init_xavier, "trunc_normal": _init_trunc_normal}


@dataclass
class ViTConfig:
    name: str = "vit"
    size: str = "base"  # tiny | small | base | large | huge
    image_size: int = 224
    patch_size: int = 16
    width: Optional[int] = None  # override the size's width / depth / heads
    depth: Optional[int] = None
    heads: Optional[int] = None
    drop_path: float = 0.0  # stochastic depth, max rate (linear over the blocks)
    # the student's flavour: D-iGPT's defaults; XTRA: learned, false, true, trunc_normal
    pos_embed: str = "sincos"  # sincos (fixed 2-D) | learned
    cls_token: bool = True  # a cls token (the student's last, the classifier's first)
    final_norm: bool = False  # a LayerNorm over the last block's tokens
    init: str = "xavier"  # xavier (MAE, D-iGPT) | trunc_normal (XTRA)
    # the classifier attends block-causally over blocks of [rows, cols] patches, as an XTRA
    # encoder was pre-trained (its probes keep the mask); null = full attention
    causal_blocks: Optional[list] = None
    pool: str = "avg"  # the classifier's features: avg (of the patch tokens) | token (cls: SAIM's)
    CHOICES: ClassVar[dict] = {"size": tuple(VIT_SIZES), "pos_embed": ("sincos", "learned"),
                               "init": tuple(INITS), "pool": ("avg", "token")}
    BOUNDS: ClassVar[dict] = {"image_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "depth": ">= 1",
                              "heads": ">= 1", "drop_path": "[0, 1)", "causal_blocks": ">= 1 pair"}


def vit_dims(cfg: ViTConfig) -> tuple[int, int, int]:
    """(width, depth, heads) of the config's standard size, each overridable."""
    if cfg.size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {cfg.size!r}; choose one of {sorted(VIT_SIZES)}")
    w, d, h = VIT_SIZES[cfg.size]
    return cfg.width or w, cfg.depth or d, cfg.heads or h


class SegmentViT(VisionTransformer):
    """ViT run over a chosen subset of its patches in a chosen order, the extra (cls) token last.

    ViTConfig's defaults make the MAE / D-iGPT student (fixed 2-D sin-cos positions, a zero cls
    token appended last, no final norm, xavier-uniform Linear init). XTRA's: pos_embed="learned",
    cls_token=False, final_norm=True, init="trunc_normal"."""

    def __init__(self, cfg: ViTConfig):
        width, depth, heads = vit_dims(cfg)
        super().__init__(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=width, depth=depth,
            num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=cfg.cls_token,
            no_embed_class=True, global_pool="token" if cfg.cls_token else "avg", fc_norm=False,
            num_classes=0, final_norm=cfg.final_norm, drop_path_rate=cfg.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.extra_tokens = int(cfg.cls_token)  # the cls token, after the patch tokens
        self.linear_init = cfg.init  # SAIM re-initialises the fused qkv per third under "xavier"
        INITS[cfg.init](self)
        if cfg.pos_embed == "sincos":
            self.pos_embed.requires_grad_(False)
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.grid, self.embed_dim)[None])
        else:
            trunc_normal_(self.pos_embed, std=0.02)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    def forward_taps(self, images: torch.Tensor, token_index: torch.Tensor, attn_mask: torch.Tensor,
                     taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Encode the patches `token_index` (B, N) in that order, plus cls last, under `attn_mask`
        (N + extra, N + extra) or None (full attention); return the outputs of blocks `taps`
        (1-based), before the final norm (`self.norm`, an Identity without one)."""
        x = gather_tokens(self.patch_embed(images) + self.pos_embed, token_index)  # true 2-D positions
        if self.cls_token is not None:
            x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        return block_outputs(self.blocks, x, attn_mask, taps)


class ViTClassifier(VisionTransformer):
    """timm's VisionTransformer, optionally under a block-causal mask over blocks of
    `causal_blocks` patches (an XTRA encoder keeps its pre-training mask when probed); without one
    it is timm's model exactly.

    Global average pool of the patch tokens (pool="avg") or the cls token (pool="token", SAIM's
    fine-tuning and probe), then the head. A student without a final norm gets a fresh fc_norm
    after the pool (MAE / D-iGPT; on cls it is the same LayerNorm as a final norm's); one with a
    final norm keeps it over the tokens, before the pool (XTRA)."""

    def __init__(self, cfg: ViTConfig, num_classes: int = 0):
        width, depth, heads = vit_dims(cfg)
        super().__init__(
            img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=num_classes,
            global_pool=cfg.pool, fc_norm=not cfg.final_norm, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=4.0, qkv_bias=True, class_token=cfg.cls_token, drop_path_rate=cfg.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
        mask = None
        if cfg.causal_blocks:
            mask = raster_block_causal_mask(tuple(self.patch_embed.grid_size), tuple(cfg.causal_blocks),
                                            prefix_tokens=self.num_prefix_tokens)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward_features(self, x, attn_mask=None, is_causal=False):
        return super().forward_features(x, attn_mask=self.attn_mask if attn_mask is None else attn_mask,
                                        is_causal=is_causal)

    def forward_intermediates(self, x, *args, attn_mask=None, **kwargs):
        return super().forward_intermediates(x, *args, attn_mask=self.attn_mask if attn_mask is None
                                             else attn_mask, **kwargs)

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N): the last block's attention over the patches (query_attention)."""
        x = self.norm_pre(self._pos_embed(self.patch_embed(images)))
        for block in self.blocks[:-1]:
            x = block(x, attn_mask=self.attn_mask)
        last = self.blocks[-1]
        attn = last.attn
        q, k, _ = attn.qkv(last.norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
        return query_attention(attn.q_norm(q), attn.k_norm(k), self.num_prefix_tokens, self.attn_mask)


@BACKBONES.register("vit")
class ViT(Backbone):
    Config = ViTConfig
    masks = MASKS  # any boolean mask goes to timm's attention as it is
    blocks = (Block,)

    @staticmethod
    def check(cfg: ViTConfig):
        Backbone.check(cfg)
        width, _, heads = vit_dims(cfg)
        if width % heads:
            raise ValueError(f"backbone.heads {heads} does not divide backbone.width {width}")
        if cfg.pool == "token" and not cfg.cls_token:
            raise ValueError("backbone.pool=token pools the cls token: set backbone.cls_token=true or pool=avg")
        if cfg.causal_blocks is not None:
            try:
                block_layout(ViT.grid(cfg), tuple(cfg.causal_blocks))
            except (ValueError, TypeError) as e:
                raise ValueError(f"backbone.causal_blocks {cfg.causal_blocks}: {e}") from None

    @staticmethod
    def student(cfg: ViTConfig) -> SegmentViT:
        return SegmentViT(cfg)

    @staticmethod
    def classifier(cfg: ViTConfig, num_classes: int = 0) -> ViTClassifier:
        return ViTClassifier(cfg, num_classes)

    import_state = staticmethod(encoder_to_timm)

    @staticmethod
    def adapt_state(state: dict, classifier: VisionTransformer) -> dict:
        has_cls, wants_cls = "cls_token" in state, classifier.cls_token is not None
        if has_cls != wants_cls:
            raise ValueError(f"its ViT has {'a' if has_cls else 'no'} cls token, while backbone.cls_token is "
                             f"{str(wants_cls).lower()}; set backbone.cls_token={str(has_cls).lower()} "
                             f"(XTRA's encoders have none){'' if has_cls else ' and backbone.pool=avg'}")
        if state["pos_embed"].shape != classifier.pos_embed.shape:  # another resolution: resample
            state = {**state, "pos_embed": resample_abs_pos_embed(
                state["pos_embed"], list(classifier.patch_embed.grid_size),
                num_prefix_tokens=classifier.num_prefix_tokens)}
        return state
