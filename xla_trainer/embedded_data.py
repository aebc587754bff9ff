"""Datasets built from images that ship inside packages, written as ImageFolder trees so the
demos run on real images with no download.

- embedded (pre-training): real photographs of scikit-image; each photo becomes one class of fixed
  crops at several scales and places; the 200 LFW faces form one more class. About 400 JPEGs,
  96x96, a few MB.
- digits (evaluation): scikit-learn's 1797 labelled 8x8 handwritten digits, upscaled, split into
  train/ and val/ (every fifth image of each class is held out).
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
          "immunohistochemistry", "stereo_motorcycle")
SIZE = 96
MARKER = ".complete"


def _photo(name: str) -> np.ndarray:
    from skimage import data
    image = getattr(data, name)()
    return image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity)


def _crops(image: Image.Image):
    w, h = image.size
    for scale in (1.0, 0.75, 0.5):
        side = int(min(w, h) * scale)
        steps = 1 if scale == 1.0 else 3
        for i in range(steps):
            for j in range(steps):
                x = (w - side) * j // max(steps - 1, 1)
                y = (h - side) * i // max(steps - 1, 1)
                yield image.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC)


def _write_tree(train: Path):
    for name in PHOTOS:
        out = train / name
        out.mkdir(parents=True)
        image = Image.fromarray(_photo(name)).convert("RGB")
        for k, crop in enumerate(_crops(image)):
            crop.save(out / f"{name}_{k:02d}.jpg", quality=92)
            crop.transpose(Image.FLIP_TOP_BOTTOM).save(out / f"{name}_{k:02d}_v.jpg", quality=92)
    from skimage import data
    faces = train / "lfw_face"
    faces.mkdir()
    for k, face in enumerate(data.lfw_subset()):
        pixels = (np.clip(face, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(
            faces / f"face_{k:03d}.jpg", quality=92)


def _write_digits(root: Path, size: int = 64):
    from sklearn.datasets import load_digits
    digits = load_digits()
    seen = {}
    for pixels, label in zip(digits.images, digits.target):
        k = seen[label] = seen.get(label, -1) + 1
        split = "val" if k % 5 == 4 else "train"
        out = root / split / str(label)
        out.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        gray.resize((size, size), Image.BICUBIC).convert("RGB").save(out / f"{label}_{k:03d}.png")


def prepare_embedded(root: str | os.PathLike) -> Path:
    """The pre-training photos under root/train."""
    return _write_once(root, lambda tmp: _write_tree(tmp / "train"))


def prepare_digits(root: str | os.PathLike) -> Path:
    """The labelled digits under root/train and root/val."""
    return _write_once(root, _write_digits)


def _write_once(root: str | os.PathLike, write) -> Path:
    """Write a tree under root once; safe to call again (returns at once) and atomic (a crash
    leaves no half-written tree behind)."""
    root = Path(root).expanduser()
    if (root / MARKER).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-", dir=root.parent))
    try:
        write(tmp)
        (tmp / MARKER).touch()
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
