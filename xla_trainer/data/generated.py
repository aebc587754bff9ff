"""Datasets built from images that ship inside packages, written as ImageFolder trees so the
demos run on real images with no download.

- embedded (pre-training): real photographs of scikit-image; each photo becomes one class of fixed
  crops at several scales and places; the 200 LFW faces form one more class. About 400 JPEGs,
  96x96, a few MB.
- digits (evaluation): scikit-learn's 1797 labelled 8x8 handwritten digits, upscaled, split into
  train/ and val/ (every fifth image of each class is held out).
"""
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import ConfigError, blocking_file

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
          "immunohistochemistry", "stereo_motorcycle")
SIZE = 96
MARKER = ".xla-trainer-dataset.json"  # {"kind": ...}: the tree is this program's own
FIX_OUT = "Pass another --out (a new or empty directory)."


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


def prepare_embedded(root: str | os.PathLike, fix: str = FIX_OUT) -> Path:
    """The pre-training photos under root/train."""
    return _write_once(root, "embedded", lambda tmp: _write_tree(tmp / "train"), fix)


def prepare_digits(root: str | os.PathLike, fix: str = FIX_OUT) -> Path:
    """The labelled digits under root/train and root/val."""
    return _write_once(root, "digits", _write_digits, fix)


def generated_root_fix(source: str) -> str:
    """The fix named when data.root (of data.source=embedded or digits) is not a generated tree."""
    return (f"data.source={source} writes its own images into data.root: to train on the images in "
            f"that directory, pass data.source=imagefolder; to write the {source} set, point data.root "
            f"at a new or empty directory, or leave it unset")


def generated_kind(root: Path) -> str | None:
    """Which generated tree `root` is ("embedded", "digits"), or None when it carries no marker
    of this project."""
    try:
        return json.loads((root / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _write_once(root: str | os.PathLike, kind: str, write, fix: str) -> Path:
    """Write the `kind` tree at root once. Only into a missing or empty directory: anything else
    that is not already this tree is a ConfigError naming the path and `fix`, and nothing is
    touched. Safe to call again (returns at once), atomic (written beside root, then renamed onto
    it: a crash leaves no half tree under root), and safe for several processes at once."""
    root = Path(root).expanduser()
    if generated_kind(root) == kind:
        return root
    _refuse_foreign(root, kind, fix)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "written_by": "xla-trainer"}))
        try:
            os.replace(tmp, root)  # succeeds onto a missing or empty directory only
        except OSError:
            if generated_kind(root) != kind:  # not another process that finished first
                _refuse_foreign(root, kind, fix)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary tree, if the rename did not take it
    return root


def _refuse_foreign(root: Path, kind: str, fix: str):
    blocker = blocking_file(str(root))
    if blocker is not None and blocker != root:
        raise ConfigError(f"'{root}' lies under '{blocker}', which is a file, not a directory; nothing was "
                          f"written. {fix}")
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    found = generated_kind(root)
    what = f"the generated '{found}' dataset" if found else "files this program did not write"
    raise ConfigError(f"'{root}' holds {what}; the {kind} dataset is written only into a new or empty "
                      f"directory, and nothing in '{root}' was touched. {fix}")


def _remove_stale_temporaries(root: Path):
    """Temporary trees that an earlier, killed writer of root left beside it (their pid is gone)."""
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
