"""Augmented views that can be reproduced exactly: a view is a crop box and a flip, sampled from
(seed, key, view index), and decoded by one function shared by the target precomputation and
training, so the student sees the very pixels the teacher's targets were computed from."""
import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from ..seeds import derive_seed

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios by default (torchvision's)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def sample_view(seed: int, key: str, index: int, width: int, height: int, crop_scale,
                crop_ratio=CROP_RATIO) -> tuple:
    """((top, left, height, width), flip) of the pre-training augmentation: torchvision's
    RandomResizedCrop parameters and a coin flip, under a generator seeded by (seed, key, index)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, key, index))
        box = RandomResizedCrop.get_params(torch.empty(0, height, width), tuple(crop_scale), tuple(crop_ratio))
        flip = bool(torch.rand(1) < 0.5)
    return tuple(int(v) for v in box), flip


def view_index(seed: int, epoch: int, key: str, num_views: int) -> int:
    """Which stored view a sample uses in an epoch."""
    return derive_seed(seed, epoch, key) % num_views


def image_size_of(jpeg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size


def decode_view(jpeg: bytes, box: tuple, flip: bool, size: int) -> np.ndarray:
    """Decode only what the crop needs, crop, resize (bicubic) to size x size, flip, normalise.

    JPEG can decode at 1/2, 1/4 or 1/8 scale for almost no cost (PIL's draft); pick the smallest
    scale that still leaves at least `size` pixels across the crop. Returns float32 (3, size, size).
    """
    top, left, h, w = box
    with Image.open(io.BytesIO(jpeg)) as image:
        full_w, full_h = image.size
        reduce = 2 ** max(0, min(3, int(math.log2(max(1.0, min(w, h) / size)))))
        if reduce > 1:
            image.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
        fx, fy = image.size[0] / full_w, image.size[1] / full_h
        image = image.convert("RGB").resize(
            (size, size), Image.BICUBIC, box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - _MEAN) / _STD
