"""SAIM (arXiv 2212.01610): stochastic-order autoregressive image modelling. Per sample the
patches take a random order; the content stream (the encoder) lets each patch see the patches
not later in that order (itself included) and cls, cls only itself; a query stream of its own
blocks starts from the position embeddings alone and, block l, cross-attends to the content
stream's block-l output under the strict order (itself excluded) plus cls, never to other
queries; LayerNorm and an MLP head predict each patch's blurred, per-patch normalised pixels.

Two forms of the same model (objective.order):
  "mask":   the official one (the default): tokens in raster order, per-sample masks from the order;
  "gather": tokens gathered into the sampled order, so both masks are fixed (causal over the
            order) and built once, no per-sample (B, N, N) masks; the same loss and gradients
            (tests/test_saim.py), but on XLA:CPU no faster (docs/methods/saim.md).
The order comes from the trainer's per-sample noise on the device (one uniform value per
patch): shapes stay static under XLA."""
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from ..layers.init import init_linears, xavier_uniform_blocks_
from ..layers.pixels import gaussian_blur, gaussian_kernel, normalise_pixels, patchify
from ..layers.taps import gather_tokens
from ..registry import OBJECTIVES, Objective, TargetInfo

ORDERS = ("gather", "mask")


@dataclass
class SAIMConfig:
    name: str = "saim"
    order: str = "mask"  # mask (official: per-sample masks) | gather (tokens in the sampled order, fixed masks)
    query_depth: Optional[int] = None  # query blocks; null = the encoder's depth (official: 12)
    query_heads: Optional[int] = None  # null = the encoder's heads
    blur_kernel: int = 9  # Gaussian blur of the targets: kernel side (0 = no blur) and sigma
    blur_sigma: float = 1.0
    norm_pix_loss: bool = True  # targets normalised per patch (the README's --norm_pix_loss)
    target_eps: float = 1e-6
    drop_path: float = 0.0  # the query blocks' stochastic depth (official pre-training: 0)
    BOUNDS: ClassVar[dict] = {"query_depth": ">= 1; null: the encoder's", "query_heads": ">= 1; null: the encoder's",
                              "blur_kernel": ">= 0; 0 = no blur", "blur_sigma": "> 0", "target_eps": "> 0",
                              "drop_path": "[0, 1)"}


def saim_masks(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (True = may attend) from each patch's place in the order, rank (B, N):
    content (B, N + 1, N + 1) over [patches, cls]: patch i sees patch j iff rank_j <= rank_i, and
    cls; cls sees only itself. Query (B, N, N + 1): patch i's query sees content patch j iff
    rank_j < rank_i, and cls."""
    B, N = rank.shape
    ones, zeros = rank.new_ones(B, N, 1, dtype=torch.bool), rank.new_zeros(B, 1, N, dtype=torch.bool)
    earlier = rank[:, None, :] <= rank[:, :, None]  # [b, i, j]: j not later than i
    cls_row = torch.cat([zeros, ones[:, :1]], dim=-1)
    content = torch.cat([torch.cat([earlier, ones], dim=-1), cls_row], dim=1)
    strictly = rank[:, None, :] < rank[:, :, None]
    return content, torch.cat([strictly, ones], dim=-1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over other tokens, separate q / k / v projections (the
    official `attn.q`, `attn.k`, `attn.v`, `attn.proj`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"objective.query_heads {heads} does not divide the width {dim}")
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.q(x), self.k(context), self.v(context)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None])
        return self.proj(out.transpose(1, 2).flatten(2))


class QueryBlock(nn.Module):
    """A pre-norm block whose attention reads the content stream: one LayerNorm (norm1) serves
    the queries and the content tokens alike, as in the official code; then the MLP."""

    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor, content: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), self.norm1(content), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def encoder_heads(encoder: nn.Module) -> int:
    """The attention heads of the encoder's blocks (timm's `num_heads`, CRATE-alpha's `heads`);
    for blocks without attention, one head per 64 channels (ViT's head width)."""
    attn = getattr(encoder.blocks[0], "attn", None)
    return getattr(attn, "num_heads", getattr(attn, "heads", None)) or max(1, encoder.embed_dim // 64)


class SAIM(nn.Module):
    own_blocks = (QueryBlock,)  # FSDP wraps the query blocks one by one too

    def __init__(self, cfg: SAIMConfig, encoder: nn.Module):
        super().__init__()
        if encoder.extra_tokens != 1:
            raise ValueError("SAIM's content stream needs exactly one extra (cls) token: set backbone.cls_token=true")
        self.encoder, self.order = encoder, cfg.order
        depth, width = encoder.depth, encoder.embed_dim
        query_depth = cfg.query_depth or depth
        if depth % query_depth:
            raise ValueError(f"objective.query_depth {query_depth} does not divide the encoder depth {depth}")
        step = depth // query_depth
        self.taps = tuple(range(step, depth + 1, step))  # query block l reads content block l * step
        heads = cfg.query_heads or encoder_heads(encoder)
        rates = [cfg.drop_path * i / max(1, query_depth - 1) for i in range(query_depth)]  # linear, as the encoder's
        self.query_blocks = nn.ModuleList(QueryBlock(width, heads, r) for r in rates)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        ph, pw = encoder.patch_size
        self.prediction_head = Mlp(width, 4 * width, ph * pw * 3)
        self.norm_pix_loss, self.target_eps = cfg.norm_pix_loss, cfg.target_eps
        self.register_buffer("blur", gaussian_kernel(cfg.blur_kernel, cfg.blur_sigma) if cfg.blur_kernel else None,
                             persistent=False)
        n = encoder.grid[0] * encoder.grid[1]
        self.register_buffer("raster_index", torch.arange(n)[None], persistent=False)
        content, query = saim_masks(torch.arange(n)[None])  # the gather form's: causal over the order
        self.register_buffer("ordered_content_mask", content, persistent=False)
        self.register_buffer("ordered_query_mask", query, persistent=False)
        self._init_weights()

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """One uniform value per patch: the patches' order is the ascending order of their noise."""
        return (self.raster_index.shape[1],)

    def _init_weights(self):
        """The official init past the encoder: xavier-uniform Linear, zero biases; and cls ~
        N(0, 0.02) (MAE's, where the D-iGPT student's is zero). In the encoder, a ViT's fused qkv
        (3d x d) stands in for the official three separate d x d q / k / v Linears, each xavier on
        its own: under the xavier init each third is re-initialised as its own matrix (std
        sqrt(2 / 2d), 1.41x the fused matrix's sqrt(2 / 4d))."""
        for part in (self.query_blocks, self.prediction_head):
            init_linears(part, nn.init.xavier_uniform_)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        if getattr(self.encoder, "linear_init", None) == "xavier":
            for block in self.encoder.blocks:
                qkv = getattr(getattr(block, "attn", None), "qkv", None)
                if isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features:
                    xavier_uniform_blocks_(qkv.weight, 3)

    def positions(self) -> torch.Tensor:
        """(1, N, C): the encoder's patch position embeddings, where the query stream starts."""
        return self.encoder.pos_embed[:, -self.raster_index.shape[1]:]

    def predict(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions (B, N, ph * pw * 3), the raster index of each prediction (B, N))."""
        B = images.shape[0]
        if self.order == "gather":
            index = noise.argsort(dim=-1)
            content_mask, query_mask = self.ordered_content_mask, self.ordered_query_mask
        else:
            index = self.raster_index.expand(B, -1)
            content_mask, query_mask = saim_masks(noise)
        streams = self.encoder.forward_taps(images, index, content_mask[:, None], self.taps)  # SDPA: (B, 1, L, L)
        g = gather_tokens(self.positions().expand(B, -1, -1), index)
        for block, content in zip(self.query_blocks, streams):
            g = block(g, content, query_mask)
        return self.prediction_head(self.norm(g)), index

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, ph * pw * 3): each patch's pixels of the blurred image (channel-fastest),
        normalised per patch (norm_pix_loss)."""
        images = images.float()
        if self.blur is not None:
            images = gaussian_blur(images, self.blur)
        pixels = patchify(images, self.encoder.patch_size)
        return normalise_pixels(pixels, self.target_eps) if self.norm_pix_loss else pixels

    def forward(self, batch: dict, noise: torch.Tensor) -> dict:
        """batch["images"] (B, 3, H, W), normalised; noise (B, N). Returns {"loss"}: the MSE over
        every patch."""
        images = batch["images"]
        pred, index = self.predict(images, noise)
        target = gather_tokens(self.targets(images), index)
        return {"loss": F.mse_loss(pred.float(), target)}


@OBJECTIVES.register("saim")
class SAIMObjective(Objective):
    Config = SAIMConfig
    mask = "arbitrary"

    @staticmethod
    def check(cfg: SAIMConfig, grid: tuple[int, int]):
        if cfg.order not in ORDERS:
            raise ValueError(f"objective.order {cfg.order!r}: choose one of {', '.join(ORDERS)}")
        if cfg.blur_kernel and cfg.blur_kernel % 2 == 0:
            raise ValueError(f"objective.blur_kernel {cfg.blur_kernel} must be odd (a centred kernel) or 0 (no blur)")

    @staticmethod
    def build(cfg: SAIMConfig, student: nn.Module, targets: TargetInfo | None) -> SAIM:
        return SAIM(cfg, student)
