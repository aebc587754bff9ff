"""Fixed 2-D sin-cos position embeddings in the layout of MAE's get_2d_sincos_pos_embed, which the
official D-iGPT checkpoints were trained with."""
import torch


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) positions -> (M, dim): sin of every frequency, then cos of every frequency."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(gh * gw, dim) float32 embeddings of a row-major (h, w) token grid: the first half of the
    channels encodes the column (w) index, the second half the row (h) index."""
    # Written by hand: timm's build_sincos2d_pos_embed orders the channels differently, so
    # imported official weights would see permuted positions.
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    halves = [_sincos_1d(index.flatten(), dim // 2) for index in (cols, rows)]
    return torch.cat(halves, dim=1).float()
