"""`visualize`: for a few images, the encoder's last-block attention (the cls query's, or the mean
query's without cls) over the patches and a 3-channel PCA of its patch features, drawn as one PNG
grid beside the inputs (the figures of the SAIM and D-iGPT papers). Attention for every backbone
whose classifier has last_attention (ViT, CRATE-alpha); features for every backbone with
forward_intermediates. On the CPU: a handful of images needs no accelerator."""
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets.folder import default_loader

from .config import Config, ConfigError, blocking_file
from .data.eval import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .data.pretrain import EMBEDDED_ROOT, read_image
from .data.remote_io import exists, write_bytes_atomic
from .evaluate import build_encoder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(images: str) -> list[Path]:
    """The sorted image files under `images` (or the embedded photos)."""
    if images == "embedded":
        from .data.generated import prepare_embedded
        root = prepare_embedded(Path(EMBEDDED_ROOT).expanduser())
    else:
        root = Path(images).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--images {images}: not a directory (pass a folder of images, or 'embedded')")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--images {images}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    return files


def read_images(files: list[Path], count: int, images: str) -> list[tuple[Path, Image.Image]]:
    """`count` readable images spread evenly over `files`, so that an ImageFolder tree gives
    images of several classes; an unreadable file is named in a warning and the next one taken."""
    n, chosen, start = min(count, len(files)), [], 0
    for k in range(n):
        for i in range(max(start, k * len(files) // n), len(files)):
            start, image = i + 1, read_image(default_loader, str(files[i]))
            if image is not None:
                chosen.append((files[i], image))
                break
    if not chosen:
        raise ConfigError(f"--images {images}: none of its {len(files)} image files can be read; pass another folder")
    return chosen


def patch_features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, C): the last block's patch tokens, before any final norm."""
    if not hasattr(encoder, "forward_intermediates"):
        raise ConfigError(f"backbone {type(encoder).__name__} has no forward_intermediates: no patch features to draw")
    return encoder.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) in [0, 1]: the first three principal components of all the images' patch
    features together, each scaled to [0, 1] over them."""
    flat = features.flatten(0, 1).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ v[:3].T
    lo, hi = proj.min(0).values, proj.max(0).values
    return ((proj - lo) / (hi - lo).clamp_min(1e-12)).reshape(*features.shape[:2], 3).float()


def hot(values: torch.Tensor) -> torch.Tensor:
    """(..., 3) in [0, 1]: black -> red -> yellow -> white, after scaling `values` to [0, 1]."""
    t = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], -1)


def panel(grid_rgb: torch.Tensor, grid: tuple[int, int], cell: int) -> torch.Tensor:
    """(N, 3) per-patch colours -> (3, cell, cell), nearest upsampling (the patch grid stays visible)."""
    image = grid_rgb.T.reshape(1, 3, *grid)
    return F.interpolate(image, size=(cell, cell), mode="nearest")[0]


def visualize(cfg: Config, images: str, out: str, count: int = 4, cell: int = 128) -> dict:
    """Write the PNG grid to `out` (rows: images; columns: input, attention, PCA) and return
    {"out", "images", "columns", "size"}."""
    if not out.endswith(".png"):
        raise ConfigError(f"--out {out}: expected a .png file name")
    if exists(out):
        raise FileExistsError(f"{out} exists already and is left as it is; pass another output name")
    folder = blocking_file(str(Path(out).parent))
    if folder is not None:
        raise ConfigError(f"--out {out}: '{folder}' is a file, not a folder; pass another output name")
    files, pictures = zip(*read_images(image_files(images), count, images))
    encoder = build_encoder(cfg).eval()
    transform = eval_transform(cfg)
    x = torch.stack([transform(picture) for picture in pictures])
    with torch.no_grad():
        attention = encoder.last_attention(x) if hasattr(encoder, "last_attention") else None
        features = patch_features(encoder, x)
    grid = _grid(encoder, features.shape[1])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    inputs = F.interpolate((x * std + mean).clamp(0, 1), size=(cell, cell), mode="bilinear", align_corners=False)
    colours = pca_rgb(features)
    rows = []
    for i in range(len(files)):
        columns = [inputs[i]]
        if attention is not None:
            columns.append(panel(hot(attention[i]), grid, cell))
        columns.append(panel(colours[i], grid, cell))
        rows.append(torch.cat(columns, dim=2))
    picture = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    names = ["input"] + (["attention"] if attention is not None else []) + ["pca"]
    return {"out": out, "images": [str(f) for f in files], "columns": names,
            "size": [picture.shape[1], picture.shape[0]]}


def _grid(encoder, n: int) -> tuple[int, int]:
    """The (rows, cols) of the n patch tokens: the patch embedding's grid, else a square."""
    grid = tuple(getattr(getattr(encoder, "patch_embed", None), "grid_size", ()))
    if len(grid) == 2 and grid[0] * grid[1] == n:
        return grid
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConfigError(f"{n} patch tokens make no square grid and the backbone names no patch_embed.grid_size")
    return side, side
