"""Training input: ImageFolder trees, the pre-training augmentation, and a per-host batch sampler
whose order depends only on (seed, step), so a resumed run reads exactly what the interrupted
run would have read, whatever the number of processes."""
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from ..config import Config, ConfigError
from .generated import generated_root_fix, prepare_embedded
from .stream import ShardStream, build_shard_loader, ignore_stop_signals
from .shards import ImageManifest
from .views import CROP_RATIO
from ..targets import TargetManifest
from ..seeds import derive_seed

EMBEDDED_ROOT = "~/.cache/xla-trainer/embedded"
PROBED_IMAGES = 16  # at most this many images read at startup to find a folder none of whose images can be read

log = logging.getLogger(__name__)


def pretrain_transform(image_size: int, crop_scale, crop_ratio=CROP_RATIO) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def read_image(loader, path: str):
    """The image at `path`, or None (a warning naming it) when it cannot be read."""
    try:
        return loader(path)
    except Exception as e:  # PIL raises many types for bad files
        log.warning("skipping unreadable image %s: %s", path, e)
        return None


def check_readable(folder: datasets.ImageFolder, key: str = "data.root"):
    """A ConfigError naming the folder when none of PROBED_IMAGES images spread over it can be
    read: a folder of damaged or non-image files fails at startup, not in a loader worker. The
    probe stops at the first readable image (one decode for a sound folder)."""
    n = len(folder)
    picks = sorted({i * n // PROBED_IMAGES for i in range(PROBED_IMAGES)}) if n > PROBED_IMAGES else range(n)
    errors = []
    for i in picks:
        path = folder.samples[i][0]
        try:
            folder.loader(path)
            return
        except Exception as e:  # PIL raises many types for bad files
            errors.append(f"{path}: {re.sub(r' <_io.*>$', '', str(e))}")  # PIL's message names the file again
    checked = f"the {n} images" if len(picks) == n else f"{len(picks)} images spread over the {n}"
    raise ConfigError(f"{key}: none of {checked} under {folder.root} can be read (e.g. {errors[0]}); replace or "
                      f"remove the damaged files, or point {key} at another folder")


class PretrainImageFolder(Dataset):
    """train/<class>/<image> read with torchvision's ImageFolder. Indexed by (index, epoch): the
    augmentation of a sample is seeded by (seed, epoch, index), independent of worker and host.
    An unreadable image is logged by path, counted, and replaced by the next readable one."""

    def __init__(self, root: str, image_size: int, crop_scale, seed: int, crop_ratio=CROP_RATIO):
        self.folder = datasets.ImageFolder(root)
        self.transform = pretrain_transform(image_size, crop_scale, crop_ratio)
        self.seed = seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        index, epoch = key
        for attempt in range(len(self.folder)):
            i = (index + attempt) % len(self.folder)
            image = read_image(self.folder.loader, self.folder.samples[i][0])
            if image is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, epoch, i))
                return self.transform(image), attempt > 0
        raise RuntimeError(f"no readable image left in {self.folder.root} (it had one at startup)")


def collate(samples) -> dict:
    images, skipped = zip(*samples)
    return {"images": torch.stack(images), "skipped": torch.tensor(skipped, dtype=torch.bool)}


class GlobalBatchSampler:
    """Yields this process's part of global batch `step` for step in [start_step, total_steps).

    Epoch e visits a permutation seeded by a hash of (seed, e); global batch b of it is split into
    process_count contiguous parts (drop_last: a trailing partial batch is never used).

    `repeats` > 1 is repeated augmentation (DeiT's RASampler, x3 in its recipes): each image of
    the permutation `repeats` times in a row, the epoch still dataset_len samples long, each copy
    keyed by its own draw (epoch * repeats + copy) so that its augmentation differs. timm's
    RepeatAugSampler is not used: it is a per-replica sampler whose order is seeded by the epoch
    alone, while these batches are a function of (seed, step), cut contiguously over the hosts."""

    def __init__(self, dataset_len: int, global_batch: int, process_index: int, process_count: int,
                 seed: int, start_step: int, total_steps: int, repeats: int = 1):
        self.n, self.global_batch, self.seed, self.repeats = dataset_len, global_batch, seed, repeats
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.steps_per_epoch = dataset_len // global_batch
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self):
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        perm, perm_epoch = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, b = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch)))
                perm = perm.repeat_interleave(self.repeats)[:self.n]
                perm_epoch = epoch
            start = b * self.global_batch + self.offset
            r = self.repeats
            yield [(int(perm[j]), epoch * r + j % r) for j in range(start, start + self.local_batch)]


def image_root(cfg: Config) -> str:
    if cfg.data.source == "embedded":
        return str(prepare_embedded(cfg.data.root or EMBEDDED_ROOT, fix=generated_root_fix("embedded")))
    if not cfg.data.root:
        raise ConfigError("data.root is not set; point it at a directory holding train/<class>/<image>, "
                          "or use data.source=embedded")
    if not Path(cfg.data.root).is_dir():
        what = "is not a directory" if Path(cfg.data.root).exists() else "does not exist"
        raise ConfigError(f"data.root '{cfg.data.root}' {what}; point it at a directory holding "
                          "train/<class>/<image>, or use data.source=embedded")
    return cfg.data.root


def build_dataset(root: str, image_size: int, crop_scale, seed: int, crop_ratio=CROP_RATIO) -> PretrainImageFolder:
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"data.root '{root}' has no train/ directory; expected "
                                f"{train_dir}/<class>/<image> (the ImageNet layout)")
    dataset = PretrainImageFolder(str(train_dir), image_size, crop_scale, seed, crop_ratio)
    check_readable(dataset.folder)
    return dataset


def build_loader(dataset, sampler, num_workers: int, collate_fn=collate, persistent: bool = True,
                 pin_memory: bool = False) -> DataLoader:
    """`persistent`: keep the workers between epochs (a loader iterated once does not need to)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      persistent_workers=persistent and num_workers > 0, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals)


@dataclass
class TrainData:
    num_samples: int
    loader: Callable  # (start_step, end_step) -> this host's batches of those global steps
    targets: TargetManifest | None = None  # precomputed targets, checked against the config


def pretrain_data(cfg: Config, runtime) -> TrainData:
    """The training input named by the config, checked before any model is built."""
    seed, workers, pin = cfg.train.seed, runtime.loader_workers(cfg.data.num_workers), runtime.pin_memory
    local_batch = cfg.train.global_batch // runtime.process_count
    if cfg.data.source != "shards":
        dataset = build_dataset(image_root(cfg), cfg.backbone.image_size, cfg.data.crop_scale, seed,
                                cfg.data.crop_ratio)
        sampler = lambda start, end: GlobalBatchSampler(
            len(dataset), cfg.train.global_batch, runtime.process_index, runtime.process_count, seed, start, end)
        return TrainData(len(dataset), lambda start, end: build_loader(dataset, sampler(start, end), workers,
                                                                                pin_memory=pin))

    images = ImageManifest.load(cfg.data.shards)
    targets = None
    if cfg.targets.source == "precomputed":
        images.check_sizes(cfg.data.shards)  # a truncated image shard would stop training when reached
        targets = TargetManifest.load(cfg.targets.prefix)
        targets.check_against(cfg, images)
    steps_per_epoch = images.num_samples // cfg.train.global_batch
    stream = lambda start, end: ShardStream(
        images, cfg.data.shards, targets, cfg.targets.prefix, image_size=cfg.backbone.image_size,
        crop_scale=cfg.data.crop_scale, crop_ratio=cfg.data.crop_ratio, seed=seed, local_batch=local_batch,
        steps_per_epoch=steps_per_epoch,
        start_step=start, total_steps=end, process_index=runtime.process_index,
        process_count=runtime.process_count, shuffle_buffer=cfg.data.shuffle_buffer)
    return TrainData(images.num_samples, lambda start, end: build_shard_loader(stream(start, end), workers, pin),
                     targets)
