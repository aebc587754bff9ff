"""CRATE-alpha (UCSC-VLAA/CRATE-alpha): the white-box transformer. Each block compresses the tokens
with multi-head subspace self-attention (MSSA: one bias-free projection per head serves as query,
key and value) and sparsifies them with two ISTA steps over an overcomplete dictionary (ODL); cls
first, learned positions, a final LayerNorm, the head on cls.

One module is both the student (forward_taps: patches in any order, cls appended last, any
boolean mask through SDPA) and the classifier (timm-style), with one state_dict. Written by hand:
neither timm nor another library has these blocks.
"""
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed
from torch import nn

from ..layers.attention_maps import query_attention
from ..layers.init import init_linears
from ..layers.taps import block_outputs, gather_tokens
from ..registry import BACKBONES, MASKS, Backbone
from ..state_dicts import square_side
from .crate_alpha_official import crate_from_official, is_official

# (width, depth, heads) of the official sizes; the dictionaries are 4 x width, heads 64 wide
CRATE_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


@dataclass
class CrateAlphaConfig:
    name: str = "crate_alpha"
    size: str = "base"  # tiny | small | base | large (B: 768 / 12 / 12 heads; L: 1024 / 24 / 16)
    image_size: int = 224
    patch_size: int = 16  # the official sizes: B/32, B/16, B/8, L/32, L/14, L/8
    width: Optional[int] = None  # override the size's width / depth / heads
    depth: Optional[int] = None
    heads: Optional[int] = None
    drop_path: float = 0.0  # the official recipes use none
    norm_eps: float = 1e-6  # the final LayerNorm: JAX's 1e-6; the PyTorch port's mlp_head.0 has 1e-5
    CHOICES: ClassVar[dict] = {"size": tuple(CRATE_SIZES)}
    BOUNDS: ClassVar[dict] = {"image_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "depth": ">= 1",
                              "heads": ">= 1", "drop_path": "[0, 1)", "norm_eps": "> 0"}


def crate_dims(cfg: CrateAlphaConfig) -> tuple[int, int, int]:
    w, d, h = CRATE_SIZES[cfg.size]
    return cfg.width or w, cfg.depth or d, cfg.heads or h


class MSSA(nn.Module):
    """softmax(U x (U x)^T / sqrt(d_head)) U x per head, U one bias-free projection; a bias-free
    output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"backbone.heads {heads} does not divide the width {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)  # q = k = v
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        w = self.qkv(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(w, w, w, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class ODL(nn.Module):
    """Two ISTA steps from zero over the dictionary D (d x p), decoded by D1 (d x p):
    z1 = ReLU(eta (D^T x - lambda)); z2 = ReLU(z1 - eta D^T (D z1 - x) - eta lambda); out D1 z2."""

    def __init__(self, dim: int, factor: int = 4, eta: float = 0.1, lmbda: float = 0.1):
        super().__init__()
        self.eta, self.lmbda = eta, lmbda
        self.D = nn.Parameter(torch.empty(dim, factor * dim))
        self.D1 = nn.Parameter(torch.empty(dim, factor * dim))
        bound = (6 / dim) ** 0.5  # flax's kaiming_uniform on a (d, p) kernel: fan in d
        for p in (self.D, self.D1):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eta, shift = self.eta, self.eta * self.lmbda
        z1 = F.relu(eta * (x @ self.D) - shift)
        z2 = F.relu(z1 - eta * ((z1 @ self.D.T - x) @ self.D) - shift)
        return z2 @ self.D1.T


class CrateBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSSA(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.odl = ODL(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.odl(self.norm2(x)))


class CrateAlpha(nn.Module):
    extra_tokens = 1  # the student's cls token, after the patches

    def __init__(self, cfg: CrateAlphaConfig, num_classes: int = 0):
        super().__init__()
        width, depth, heads = crate_dims(cfg)
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, width, bias=True)
        self.grid, self.patch_size = tuple(self.patch_embed.grid_size), tuple(self.patch_embed.patch_size)
        self.embed_dim = self.num_features = width
        self.num_classes = num_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], width))  # cls row first
        rates = torch.linspace(0, cfg.drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(CrateBlock(width, heads, r) for r in rates)
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """The JAX code's: kernels ~ N(0, 0.02) (the patch conv kaiming-uniform), positions ~
        N(0, 0.02), cls ~ N(0, 1e-6), zero biases; ODL's dictionaries as ODL makes them."""
        init_linears(self, partial(nn.init.normal_, std=0.02))
        conv = self.patch_embed.proj
        nn.init.kaiming_uniform_(conv.weight, nonlinearity="relu")  # flax: bound sqrt(6 / fan in)
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # --- the student ---
    def forward_taps(self, images, token_index, attn_mask, taps):
        """The patches `token_index` (B, N) in that order, cls last, under attn_mask or None."""
        x = gather_tokens(self.patch_embed(images) + self.pos_embed[:, 1:], token_index)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return block_outputs(self.blocks, torch.cat([x, cls], dim=1), attn_mask, taps)

    # --- the classifier ---
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """cls first, then the patches, each with its position."""
        x = self.patch_embed(images)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_intermediates(self, images: torch.Tensor, indices: int = 1, norm: bool = False,
                              output_fmt: str = "NLC", intermediates_only: bool = True) -> list[torch.Tensor]:
        """The patch tokens (B, N, C) after each of the last `indices` blocks, cls left out (timm's
        interface, the NLC / intermediates-only form the probes use)."""
        if output_fmt != "NLC" or not intermediates_only:
            raise ValueError("CrateAlpha.forward_intermediates gives NLC intermediates only")
        x = self.embed(images)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= self.depth - indices:
                outs.append((self.norm(x) if norm else x)[:, 1:])
        return outs

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N): the last block's attention of cls over the patches (query_attention)."""
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        w = last.attn.qkv(last.norm1(x)).unflatten(-1, (last.attn.heads, -1)).transpose(1, 2)  # q = k
        return query_attention(w, w, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """The official decays kernels only: not the dictionaries, positions, cls, norms, biases."""
        return {"cls_token", "pos_embed"} | {n for n, _ in self.named_parameters() if n.endswith((".D", ".D1"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^(?:cls_token|pos_embed|patch_embed)", "blocks": [(r"^blocks\.(\d+)", None),
                                                                           (r"^norm", (99999,))]}


@BACKBONES.register("crate_alpha")
class CrateAlphaBackbone(Backbone):
    Config = CrateAlphaConfig
    masks = MASKS  # SDPA takes any boolean mask
    blocks = (CrateBlock,)

    @staticmethod
    def check(cfg: CrateAlphaConfig):
        Backbone.check(cfg)
        width, _, heads = crate_dims(cfg)
        if width % heads:
            raise ValueError(f"backbone.heads {heads} does not divide backbone.width {width}")

    @staticmethod
    def student(cfg: CrateAlphaConfig) -> CrateAlpha:
        return CrateAlpha(cfg)

    @staticmethod
    def classifier(cfg: CrateAlphaConfig, num_classes: int = 0) -> CrateAlpha:
        return CrateAlpha(cfg, num_classes)

    @staticmethod
    def import_state(state: dict) -> dict:
        """Ours (a pre-training checkpoint's encoder.*, a classifier) or the official port's."""
        return crate_from_official(state) if is_official(state) else Backbone.import_state(state)

    @staticmethod
    def adapt_state(state: dict, classifier: CrateAlpha) -> dict:
        """Another patch size or resolution, as the official fine-tuning does: the patch kernel
        resized bilinearly, the position grid resampled linearly (corners aligned, as
        scipy.ndimage.zoom(order=1)), the cls position kept. By hand: timm's
        resample_abs_pos_embed does not align corners."""
        state = dict(state)
        kernel, target = state["patch_embed.proj.weight"], classifier.patch_embed.proj.weight
        if kernel.shape != target.shape:
            state["patch_embed.proj.weight"] = F.interpolate(kernel.float(), size=target.shape[-2:], mode="bilinear",
                                                             align_corners=False, antialias=True).to(kernel.dtype)
        pos = state["pos_embed"]
        if pos.shape != classifier.pos_embed.shape:
            old = square_side(pos.shape[1] - 1)
            grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=classifier.grid, mode="bilinear", align_corners=True)
            state["pos_embed"] = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)], dim=1)
        return state
