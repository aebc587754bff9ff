"""XTRA (arXiv 2411.15648): the encoder sees every patch in raster order under a block-causal mask
over blocks of patches; a projection MLP and a predictor under the same mask follow; a per-block
pixel head reads each block's outputs and predicts the next block's normalised pixels.

Layout (the official code's): tokens stay in raster PATCH order, blocks are numbered in raster
BLOCK order; the head reads block b's T outputs concatenated dim-major (index d * T + t, t the
token's raster place inside the block); targets are the block's pixels in (C, y, x) order."""
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..layers.init import init_linears
from ..layers.pixels import normalise_pixels
from ..layers.segments import block_layout, raster_block_causal_mask
from ..registry import OBJECTIVES, Objective, TargetInfo


@dataclass
class XTRAConfig:
    name: str = "xtra"
    block: list = field(default_factory=lambda: [4, 4])  # patches per block [rows, cols]: 64x64 px at patch 16
    proj_hidden: int = 4096
    predictor_width: Optional[int] = None  # null = the encoder's (B/16: 768; the H/14 checkpoint: 640)
    predictor_depth: int = 8
    predictor_heads: int = 6
    head_hidden: Optional[int] = None  # null = half the head's input (B/16: 6144; the H/14 checkpoint: 9408)
    predictor_fp32: bool = True  # official (its fp16 runs): the predictor outside autocast
    decay_pos_embed: bool = True  # official: weight decay on both position embeddings
    target_eps: float = 1e-6  # per-block target normalisation
    BOUNDS: ClassVar[dict] = {"block": ">= 1 pair", "proj_hidden": ">= 1", "predictor_width": ">= 1",
                              "predictor_depth": ">= 1", "predictor_heads": ">= 1", "head_hidden": ">= 1",
                              "target_eps": "> 0"}


class MLPHead(nn.Module):
    """Linear, GELU, Linear (the official MLPHead: `mlp.0`, `mlp.2`)."""

    def __init__(self, dim: int, hidden: int, out: int, out_bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out, bias=out_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Predictor(nn.Module):
    """Pre-norm ViT blocks over the projected tokens, own learned positions, final LayerNorm."""

    def __init__(self, tokens: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"objective.predictor_heads {heads} does not divide the predictor width {width}")
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)


def block_pixels(images: torch.Tensor, block_px: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, S, C * bh * bw): each block's pixels in (C, y, x) order, blocks of
    `block_px` pixels in raster block order."""
    (bh, bw), (H, W) = block_px, images.shape[-2:]
    x = images.unflatten(2, (H // bh, bh)).unflatten(4, (W // bw, bw))  # B C sh bh sw bw
    return x.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


class XTRA(nn.Module):
    own_blocks = (Block,)  # FSDP wraps the predictor's blocks one by one too
    noise_shape = None  # no randomness: the order is fixed

    def __init__(self, cfg: XTRAConfig, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        grid, block = tuple(encoder.grid), tuple(cfg.block)
        self.layout = block_layout(grid, block)
        n, extra = grid[0] * grid[1], encoder.extra_tokens
        self.register_buffer("encoder_mask", raster_block_causal_mask(grid, block, suffix_tokens=extra),
                             persistent=False)
        self.register_buffer("predictor_mask", raster_block_causal_mask(grid, block), persistent=False)
        self.register_buffer("block_index", self.layout.patch_index(), persistent=False)  # (S, T)
        # a causal-only student (a scan) reads the patches in block order, so that a block sees
        # only itself and the blocks before it, then its outputs go back to raster order
        self.causal_encoder = getattr(encoder, "causal_only", False)
        order = self.block_index.flatten() if self.causal_encoder else torch.arange(n)
        self.register_buffer("encoder_index", order[None], persistent=False)
        self.register_buffer("raster_of_encoder", order.argsort(), persistent=False)
        width = cfg.predictor_width or encoder.embed_dim
        self.proj = MLPHead(encoder.embed_dim, cfg.proj_hidden, width, out_bias=False)
        self.predictor = Predictor(n, width, cfg.predictor_depth, cfg.predictor_heads)
        head_in = width * self.layout.tokens_per_segment
        self.head = MLPHead(head_in, cfg.head_hidden or head_in // 2, 3 * self.block_pixels_shape[0] *
                            self.block_pixels_shape[1], out_bias=True)
        self.predictor_fp32, self.decay_pos_embed = cfg.predictor_fp32, cfg.decay_pos_embed
        self.target_eps = cfg.target_eps
        self._init_weights()

    @property
    def block_pixels_shape(self) -> tuple[int, int]:
        (bh, bw), (ph, pw) = self.layout.segment_shape, self.encoder.patch_size
        return bh * ph, bw * pw

    def _init_weights(self):
        """The official init of the parts past the encoder: Linear ~ N(0, 0.02), zero biases,
        positions ~ N(0, 0.02)."""
        for part in (self.proj, self.predictor, self.head):
            init_linears(part, partial(trunc_normal_, std=0.02))
        trunc_normal_(self.predictor.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The official recipe decays the position embeddings (decay_pos_embed=True)."""
        if self.decay_pos_embed:
            return set()
        return {name for name, _ in self.named_parameters() if name.endswith("pos_embed")}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, C * block pixels): block b's prediction of block b + 1 (the last one unused)."""
        x = self.encoder.forward_taps(images, self.encoder_index.expand(images.shape[0], -1),
                                      None if self.causal_encoder else self.encoder_mask, (self.encoder.depth,))[-1]
        x = x[:, self.raster_of_encoder]  # the patches in raster order, the extra tokens dropped
        x = self.proj(getattr(self.encoder, "norm", nn.Identity())(x))
        if self.predictor_fp32:  # the official code runs its predictor in float32 under fp16 autocast
            with torch.autocast(x.device.type, enabled=False):
                x = self.predictor(x.float(), self.predictor_mask)
        else:
            x = self.predictor(x, self.predictor_mask)
        blocks = x[:, self.block_index]  # (B, S, T, D)
        return self.head(blocks.transpose(2, 3).flatten(2))  # dim-major: index d * T + t

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, C * block pixels): each block's pixels, normalised per block."""
        return normalise_pixels(block_pixels(images, self.block_pixels_shape), self.target_eps)

    def forward(self, batch: dict, noise=None) -> dict:
        """batch["images"] (B, 3, H, W), normalised. Returns {"loss"}: the MSE of each block's
        prediction against the next block's normalised pixels."""
        images = batch["images"]
        pred = self.predict(images)
        return {"loss": F.mse_loss(pred[:, :-1].float(), self.targets(images)[:, 1:])}


@OBJECTIVES.register("xtra")
class XTRAObjective(Objective):
    Config = XTRAConfig
    mask = "block-causal"
    causal_student = True  # with the patches in block order (XTRA.encoder_index)

    @staticmethod
    def check(cfg: XTRAConfig, grid: tuple[int, int]):
        try:
            layout = block_layout(tuple(grid), tuple(cfg.block))
        except (ValueError, TypeError) as e:
            raise ValueError(f"objective.block {cfg.block}: {e}") from None
        if layout.num_segments < 2:
            raise ValueError(f"objective.block {cfg.block} makes one block of the {grid[0]}x{grid[1]} grid; "
                             f"XTRA needs at least two (a block predicts the next)")

    @staticmethod
    def build(cfg: XTRAConfig, student: nn.Module, targets: TargetInfo | None) -> XTRA:
        return XTRA(cfg, student)
