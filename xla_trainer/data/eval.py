"""Labelled input for the evaluations: root/train/<class>/<image> and root/val/<class>/<image>.

Training batches follow the pre-training sampler (order a function of (seed, step), split over the
hosts); their augmentation (timm's RandAugment, random erasing) is seeded per (seed, epoch, index),
and mixup/cutmix with label smoothing (timm's Mixup) runs in the loader workers, on the host, so
the device step sees static shapes whatever box or lambda was drawn. Val batches are padded to
train.eval_batch with rows marked invalid, so the eval step compiles once."""
import io
import itertools
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageFilter
from timm.data import Mixup, auto_augment, create_transform
from timm.data.mixup import mixup_target
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import datasets, transforms

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from ..config import Config, ConfigError
from .pretrain import GlobalBatchSampler, build_loader, check_readable, read_image
from .stream import ignore_stop_signals
from .generated import generated_root_fix, prepare_digits
from .stream import ShardStream, build_shard_loader
from .shards import ImageManifest, iter_samples, jpeg_of, join, label_of
from ..seeds import derive_seed

log = logging.getLogger(__name__)

DIGITS_ROOT = "~/.cache/xla-trainer/digits"


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """RandAugment's 'inc1' posterize keeps 0 bits at magnitude 10, which Pillow >= 11 rejects
    (timm 1.0 passes it on): keeping no bits is a black image, what older Pillow returned."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


class RandomBlur:
    """PIL's Gaussian blur of a radius uniform in [low, high] (DeiT III's; torchvision's
    GaussianBlur takes a kernel size instead). Python's RNG, which `seeded` seeds."""

    def __init__(self, low: float = 0.1, high: float = 2.0):
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))


def three_augment(image_size: int, crop_scale, color_jitter: float | None) -> transforms.Compose:
    """DeiT III's ThreeAugment (deit/augment.py; timm has none): RandomResizedCrop bicubic + flip,
    then one of grayscale, solarize (threshold 128) or blur, then ColorJitter, tensor, normalise."""
    jitter = [transforms.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
    return transforms.Compose([
        RandomResizedCropAndInterpolation(image_size, scale=tuple(crop_scale), interpolation="bicubic"),
        transforms.RandomHorizontalFlip(),
        transforms.RandomChoice([transforms.Grayscale(3), transforms.RandomSolarize(128, p=1.0), RandomBlur()]),
        *jitter, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(cfg: Config):
    """RandomResizedCrop, flip, then RandAugment and random erasing where augment.* asks (timm),
    or ThreeAugment (augment.three_augment)."""
    a = cfg.augment
    if a.three_augment:
        if a.rand_augment or a.random_erasing:
            raise ConfigError("augment.three_augment replaces RandAugment and random erasing; set "
                              "augment.rand_augment=null and augment.random_erasing=0, or three_augment=false")
        return three_augment(cfg.backbone.image_size, cfg.data.crop_scale, a.color_jitter)
    return create_transform(cfg.backbone.image_size, is_training=True, scale=tuple(cfg.data.crop_scale),
                            auto_augment=a.rand_augment, re_prob=a.random_erasing, color_jitter=a.color_jitter,
                            interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(cfg: Config):
    return create_transform(cfg.backbone.image_size, is_training=False, interpolation="bicubic",
                            crop_pct=cfg.backbone.image_size / cfg.data.eval_resize,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """The transform under torch's and Python's RNG (RandAugment uses the latter) seeded by
    `seed`: the same pixels on every worker, host and restart."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        pixels = transform(image)
    random.setstate(python_state)
    return pixels


class LabelledImages(Dataset):
    """An ImageFolder indexed by (index, draw) for training (the augmentation seeded by
    (seed, draw, index); the draw is the epoch, or epoch x repeats + copy under repeated
    augmentation) or by (index, valid) for evaluation (padding rows repeat an image and are
    marked invalid). An unreadable image is logged by path: in training replaced by the next
    readable one, in evaluation a row of `blank` marked invalid (as in PaddedShardSplit)."""

    def __init__(self, folder: datasets.ImageFolder, transform, seed: int = 0, blank: torch.Tensor | None = None):
        self.folder, self.transform, self.seed, self.blank = folder, transform, seed, blank

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        index, tag = key
        evaluation = isinstance(tag, bool)
        for attempt in range(1 if evaluation else len(self.folder)):
            i = (index + attempt) % len(self.folder)
            path, label = self.folder.samples[i]
            image = read_image(self.folder.loader, path)
            if image is not None:
                return seeded(self.transform, image, derive_seed(self.seed, int(tag), i)), label, tag
        if evaluation:
            return self.blank, label, False
        raise RuntimeError(f"no readable image left in {self.folder.root} (it had one at startup)")


def decode_labelled(key: str, jpeg: bytes, label: int, shard: str) -> Image.Image | None:
    """The image of a labelled shard sample; None (logged) when unreadable."""
    if label < 0:
        raise RuntimeError(f"sample {key} in shard {shard} has no label (.cls or .json); "
                           f"the evaluations need labelled shards (make-shards writes them)")
    try:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")
    except Exception as e:  # a corrupt JPEG, whatever PIL raises
        log.warning("skipping unreadable image %s in shard %s: %s", key, shard, e)
        return None


class LabelledShardStream(ShardStream):
    """Training batches from labelled shards: the pre-training stream's split over hosts and
    workers, shuffle buffer, equal batch counts per host and resume; each image through the timm
    transform seeded by (seed, epoch, key), the batch through MixCollate."""

    def __init__(self, images: ImageManifest, prefix: str, transform, collate, **stream):
        super().__init__(images, prefix, None, None, image_size=0, crop_scale=None, **stream)
        self.transform, self.collate = transform, collate

    def _decode(self, item, epoch: int):
        key, jpeg, _, shard, label = item
        image = decode_labelled(key, jpeg, label, shard)
        return None if image is None else (seeded(self.transform, image, derive_seed(self.seed, epoch, key)), label, epoch)

    def _collate(self, decoded: list, skipped: torch.Tensor) -> dict:
        return self.collate(decoded)


class PaddedShardSplit(IterableDataset):
    """Every sample of a shard set once, in order, for evaluation: host h reads shards h, h + P,
    ...; its batches of local_batch are padded (rows marked invalid) to the same count on every
    host; worker w of W decodes batches w, w + W, ... (DataLoader's order). An unreadable image
    is a row marked invalid."""

    def __init__(self, manifest: ImageManifest, prefix: str, transform, image_size: int,
                 local_batch: int, process_index: int, process_count: int):
        self.prefix, self.transform, self.local_batch = prefix, transform, local_batch
        self.names = [s.name for s in manifest.shards[process_index::process_count]]
        per_host = [sum(s.samples for s in manifest.shards[p::process_count]) for p in range(process_count)]
        self.num_batches = -(-max(per_host) // local_batch)
        self.blank = torch.zeros(3, image_size, image_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        samples = ((key, sample, name) for name in self.names for key, sample in iter_samples(join(self.prefix, name)))
        for b in range(self.num_batches):
            rows = list(itertools.islice(samples, self.local_batch))
            if b % workers == worker:
                yield eval_collate([self._row(*row) for row in rows] +
                                   [(self.blank, 0, False)] * (self.local_batch - len(rows)))

    def _row(self, key: str, sample: dict, shard: str):
        label = label_of(sample)
        image = decode_labelled(key, jpeg_of(sample), label, shard)
        return (self.blank, 0, False) if image is None else (self.transform(image), label, True)


class MixCollate:
    """Stacks a training batch; soft targets from mixup/cutmix (timm) or label smoothing alone."""

    def __init__(self, cfg: Config, num_classes: int):
        a = cfg.augment
        self.num_classes, self.smoothing = num_classes, a.label_smoothing
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                           num_classes=num_classes) if a.mixup > 0 or a.cutmix > 0 else None

    def __call__(self, samples) -> dict:
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples])
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        else:
            targets = mixup_target(labels, self.num_classes, smoothing=self.smoothing)
        return {"images": images, "targets": targets}


def eval_collate(samples) -> dict:
    return {"images": torch.stack([s[0] for s in samples]),
            "labels": torch.tensor([s[1] for s in samples]),
            "valid": torch.tensor([bool(s[2]) for s in samples])}


class PaddedBatchSampler:
    """This process's rows of every global batch of `n` samples in order, the last batch padded:
    (index, valid) pairs, every process getting the same number of equal batches."""

    def __init__(self, n: int, global_batch: int, process_index: int, process_count: int):
        self.n, self.global_batch = n, global_batch
        self.local = global_batch // process_count
        self.offset = process_index * self.local

    def __len__(self):
        return -(-self.n // self.global_batch)

    def __iter__(self):
        for b in range(len(self)):
            first = b * self.global_batch + self.offset
            yield [(i if i < self.n else 0, i < self.n) for i in range(first, first + self.local)]


@dataclass
class EvalData:
    classes: list
    train_len: int
    val_len: int
    train: Callable  # (start_step, end_step) -> this host's training batches of those global steps
    train_in_order: Callable  # () -> this host's padded batches of the train split, eval transform
    val: Callable  # () -> this host's padded val batches

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_root(cfg: Config) -> Path:
    if cfg.data.source == "digits":
        return prepare_digits(cfg.data.root or DIGITS_ROOT, fix=generated_root_fix("digits"))
    if not cfg.data.root:
        raise ConfigError("data.root is not set; point it at a directory holding train/<class>/<image> "
                          "and val/<class>/<image>, or use data.source=digits")
    root = Path(cfg.data.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"data.root '{root}' has no {split}/ directory; expected "
                              f"{root}/{split}/<class>/<image> (the ImageNet layout)")
    return root


def classifier_data(cfg: Config, runtime) -> EvalData:
    """The labelled splits, checked before any model is built."""
    t = cfg.train
    if cfg.data.repeated_aug < 1:
        raise ConfigError(f"data.repeated_aug must be >= 1 (1 = off), got {cfg.data.repeated_aug}")
    for name, batch in (("train.global_batch", t.global_batch), ("train.eval_batch", t.eval_batch)):
        if batch % runtime.data_parallel_size:
            raise ConfigError(f"{name} {batch} is not divisible by the {runtime.data_parallel_size} "
                              f"data-parallel devices")
    return shard_data(cfg, runtime) if cfg.data.source == "shards" else folder_data(cfg, runtime)


def folder_data(cfg: Config, runtime) -> EvalData:
    root = split_root(cfg)
    train_folder, val_folder = datasets.ImageFolder(root / "train"), datasets.ImageFolder(root / "val")
    if train_folder.classes != val_folder.classes:
        raise ConfigError(f"{root}/train and {root}/val hold different classes")
    for folder in (train_folder, val_folder):
        check_readable(folder)
    t, workers = cfg.train, runtime.loader_workers(cfg.data.num_workers)
    train_set = LabelledImages(train_folder, train_transform(cfg), t.seed)
    collate = MixCollate(cfg, len(train_folder.classes))
    blank = torch.zeros(3, cfg.backbone.image_size, cfg.backbone.image_size)
    in_order = lambda folder: build_loader(
        LabelledImages(folder, eval_transform(cfg), blank=blank),
        PaddedBatchSampler(len(folder), t.eval_batch, runtime.process_index, runtime.process_count),
        workers, eval_collate, persistent=False)
    return EvalData(
        train_folder.classes, len(train_folder), len(val_folder),
        train=lambda start, end: build_loader(train_set, GlobalBatchSampler(
            len(train_folder), t.global_batch, runtime.process_index, runtime.process_count, t.seed,
            start, end, cfg.data.repeated_aug), workers, collate),
        train_in_order=lambda: in_order(train_folder),
        val=lambda: in_order(val_folder))


def shard_data(cfg: Config, runtime) -> EvalData:
    """data.shards/train and data.shards/val, each written by make-shards from an ImageFolder
    split (labels in <key>.cls, class names in the manifest)."""
    if not cfg.data.shards:
        raise ConfigError("data.source=shards needs data.shards, the prefix holding train/ and val/ "
                          "(each written by `xla-trainer make-shards`)")
    if cfg.data.repeated_aug != 1:
        raise ConfigError(f"data.repeated_aug {cfg.data.repeated_aug}: repeated augmentation needs an image "
                          f"tree (data.source imagefolder or digits), not streamed shards; set data.repeated_aug=1")
    train_prefix, val_prefix = join(cfg.data.shards, "train"), join(cfg.data.shards, "val")
    train, val = ImageManifest.load(train_prefix), ImageManifest.load(val_prefix)
    if not train.classes or train.classes != val.classes:
        raise ConfigError(f"{train_prefix} and {val_prefix} must name the same classes in their manifests "
                          f"(make-shards writes them from the ImageFolder tree)")
    t, workers, p = cfg.train, runtime.loader_workers(cfg.data.num_workers), runtime.process_count
    stream = lambda start, end: LabelledShardStream(
        train, train_prefix, train_transform(cfg), MixCollate(cfg, len(train.classes)), seed=t.seed,
        local_batch=t.global_batch // p, steps_per_epoch=train.num_samples // t.global_batch, start_step=start,
        total_steps=end, process_index=runtime.process_index, process_count=p,
        shuffle_buffer=cfg.data.shuffle_buffer)
    in_order = lambda manifest, prefix: DataLoader(
        PaddedShardSplit(manifest, prefix, eval_transform(cfg), cfg.backbone.image_size, t.eval_batch // p,
                         runtime.process_index, p),
        batch_size=None, num_workers=workers, worker_init_fn=ignore_stop_signals)
    return EvalData(train.classes, train.num_samples, val.num_samples,
                    train=lambda start, end: build_shard_loader(stream(start, end), workers),
                    train_in_order=lambda: in_order(train, train_prefix),
                    val=lambda: in_order(val, val_prefix))
