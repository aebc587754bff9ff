"""Feature-prediction decoder of D-iGPT: queries at target positions attend to themselves and,
layer by layer, to a projection of the encoder's tapped features, under the same mask."""
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from ..layers.init import init_linears
from ..layers.pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    # timm has no masked cross-attention layer; this is its self-attention with q and kv split.
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q = heads(self.q(x))
        k, v = map(heads, self.kv(context).chunk(2, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2_q = LayerNorm(dim)
        self.norm2_kv = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q = q + self.self_attn(self.norm1(q), attn_mask=attn_mask)
        q = q + self.cross_attn(self.norm2_q(q), self.norm2_kv(kv), attn_mask)
        return q + self.mlp(self.norm3(q))


class FeaturePredictor(nn.Module):
    """One D-iGPT decoder ("ar" or "kd"): LayerNorms over the tapped encoder outputs, a learned
    query token plus fixed sin-cos positions of the target patches, `depth` DecoderBlocks, then a
    LayerNorm + Linear head to the teacher width.

    Each decoder owns its tap norm, as in the official model: one LayerNorm applied to every tap
    when `shared_tap_norm`, else one per tap. `enc2dec` maps the concatenated taps to
    depth x width and is read as (width, depth), depth last, the official checkpoint's layout, so
    its weights import without reshuffling.

    Init, the official model's: every Linear (enc2dec, attention, MLP, head) xavier-uniform with
    zero bias, LayerNorms ones / zeros, the query token ~ N(0, 0.02). The layer shapes are the
    official ones (self-attention one fused qkv d -> 3d, cross-attention q d -> d and one fused
    kv d -> 2d, enc2dec one (taps x enc_dim) -> depth x width matrix), so each is initialised as
    one matrix, as there.
    """

    def __init__(self, enc_dim: int, num_taps: int, grid: tuple[int, int], width: int, depth: int,
                 heads: int, out_dim: int, shared_tap_norm: bool):
        super().__init__()
        self.depth, self.num_taps = depth, num_taps
        # eps 1e-5 (torch's default), unlike the 1e-6 elsewhere: the official tap norms
        self.tap_norm = nn.LayerNorm(enc_dim) if shared_tap_norm else nn.ModuleList(
            nn.LayerNorm(enc_dim) for _ in range(num_taps))
        self.enc2dec = nn.Linear(enc_dim * num_taps, width * depth)
        self.query_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = sincos_2d(grid, width)
        self.register_buffer("pos_embed", torch.cat([pos, torch.zeros(1, width)]), persistent=False)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(depth))
        self.head_norm = LayerNorm(width)  # eps 1e-6, as the official ar_norm / kd_norm
        self.head = nn.Linear(width, out_dim)
        init_linears(self, nn.init.xavier_uniform_)
        nn.init.normal_(self.query_token, std=0.02)

    def tap_norms(self) -> list[nn.LayerNorm]:
        """The LayerNorm of each tap, in tap order."""
        if isinstance(self.tap_norm, nn.LayerNorm):
            return [self.tap_norm] * self.num_taps
        return list(self.tap_norm)

    def forward(self, taps: list[torch.Tensor], query_index: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        """taps: the tapped encoder outputs, each (B, N+1, enc_dim); query_index (B, N) raster
        positions of the predicted patches; the last query (position row N = zeros) predicts the
        teacher's cls token."""
        if len(taps) != self.num_taps:
            raise ValueError(f"expected {self.num_taps} encoder taps, got {len(taps)}")
        features = torch.cat([norm(t) for norm, t in zip(self.tap_norms(), taps)], dim=-1)
        cls_row = torch.full_like(query_index[:, :1], self.pos_embed.shape[0] - 1)
        pos = self.pos_embed[torch.cat([query_index, cls_row], dim=1)]
        q = self.query_token + pos
        context = self.enc2dec(features).unflatten(-1, (-1, self.depth))
        for i, block in enumerate(self.blocks):
            q = block(q, context[..., i], attn_mask)
        return self.head(self.head_norm(q))
