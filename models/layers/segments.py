"""Segment layout, per-sample segment order and the block-causal masks of D-iGPT and XTRA.

A patch grid is cut into `split = (rows, cols)` equal segments. Segments are numbered in raster
order and so are the patches inside a segment, so `patch_index[s, t]` is the raster index in the
full grid of token `t` of segment `s`. Every segment has the same shape, which keeps all token
counts static for XLA: only which segment sits in which sequence slot changes per sample.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentLayout:
    grid: tuple[int, int]
    split: tuple[int, int]

    def __post_init__(self):
        for axis, (g, s) in enumerate(zip(self.grid, self.split)):
            if s < 1 or g % s:
                raise ValueError(
                    f"a {self.grid[0]}x{self.grid[1]} token grid does not split into "
                    f"{self.split[0]}x{self.split[1]} equal segments (axis {axis}: {g} % {s} != 0); "
                    f"pick an image_size / patch_size whose grid is a multiple of the segment split")

    @property
    def segment_shape(self) -> tuple[int, int]:
        return self.grid[0] // self.split[0], self.grid[1] // self.split[1]

    @property
    def num_segments(self) -> int:
        return self.split[0] * self.split[1]

    @property
    def tokens_per_segment(self) -> int:
        h, w = self.segment_shape
        return h * w

    def patch_index(self) -> torch.Tensor:
        """(num_segments, tokens_per_segment) raster indices into the full grid."""
        gh, gw = self.grid
        sh, sw = self.segment_shape
        raster = torch.arange(gh * gw).reshape(self.split[0], sh, self.split[1], sw)
        return raster.permute(0, 2, 1, 3).reshape(self.num_segments, sh * sw)


def segment_order(noise: torch.Tensor) -> torch.Tensor:
    """Per-sample random permutation of segments from uniform noise (B, S), drawn on the device:
    argsort of noise keeps shapes static, unlike a host-side randperm per sample."""
    return noise.argsort(dim=-1)


def block_causal_mask(num_blocks: int, block_len: int, cls_visible_to_last_block: bool) -> torch.Tensor:
    """Boolean (N, N) mask, True = may attend, over `num_blocks` blocks then one cls token at the end.

    Full attention inside a block, causal between blocks; the cls token sees everything. Whether
    any block sees cls: in the official D-iGPT code the last block does (a side effect of padding
    its mask by reflection), `cls_visible_to_last_block=True` reproduces that; False keeps cls
    strictly last: no block sees it. The clean form is "no block", not "every block": cls sees all
    blocks, so a block that read it would learn of later blocks (from the second layer on, and in
    D-iGPT's decoders at once: the AR query of slot k would read, through the encoder's cls, the
    segment it has to predict). Only the last block may see cls without a leak, since it sees
    every block anyway; that is why the official quirk is harmless, and why it is the only block.
    """
    block = torch.arange(num_blocks).repeat_interleave(block_len)
    mask = block[:, None] >= block[None, :]
    n = num_blocks * block_len + 1
    full = torch.zeros(n, n, dtype=torch.bool)
    full[:-1, :-1] = mask
    full[-1, :] = True
    if cls_visible_to_last_block:
        full[(num_blocks - 1) * block_len:-1, -1] = True
    return full


def block_layout(grid: tuple[int, int], block: tuple[int, int]) -> SegmentLayout:
    """The grid cut into blocks of `block` (rows, cols) patches, numbered in raster block order."""
    if len(block) != 2 or grid[0] % block[0] or grid[1] % block[1] or min(block) < 1:
        raise ValueError(f"blocks of {'x'.join(map(str, block))} patches do not tile the "
                         f"{grid[0]}x{grid[1]} patch grid; pick a block shape that divides it")
    return SegmentLayout(grid, (grid[0] // block[0], grid[1] // block[1]))


def raster_block_causal_mask(grid: tuple[int, int], block: tuple[int, int], prefix_tokens: int = 0,
                             suffix_tokens: int = 0) -> torch.Tensor:
    """Boolean mask, True = may attend, over `prefix_tokens`, the patches in raster PATCH order
    (XTRA keeps them so: a block's tokens are not contiguous), then `suffix_tokens`. Patch i sees
    patch j iff block(j) <= block(i), blocks of `block` patches in raster block order. The extra
    (cls) tokens see only each other, so they carry no pixels and every patch may see them: no
    block learns of a later one through them."""
    layout = block_layout(grid, block)
    block_of = torch.empty(grid[0] * grid[1], dtype=torch.long)
    block_of[layout.patch_index().flatten()] = torch.arange(layout.num_segments).repeat_interleave(
        layout.tokens_per_segment)
    extra = torch.full((prefix_tokens,), -1), torch.full((suffix_tokens,), -1)
    rank = torch.cat([extra[0], block_of, extra[1]])  # extra tokens rank before every block
    mask = rank[:, None] >= rank[None, :]
    is_extra = rank < 0
    mask[is_extra[:, None] & ~is_extra[None, :]] = False  # ... yet see no patch
    return mask
