"""Training input: ImageFolder trees, the pre-training augmentation, and a per-host batch sampler
whose order depends only on (seed, step), so a resumed run reads exactly what the interrupted
run would have read, whatever the number of processes."""
import hashlib
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from models.teacher import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def pretrain_transform(image_size: int, crop_scale) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class PretrainImageFolder(Dataset):
    """train/<class>/<image> read with torchvision's ImageFolder. Indexed by (index, epoch): the
    augmentation of a sample is seeded by (seed, epoch, index), independent of worker and host.
    An unreadable image is logged by path, counted, and replaced by the next readable one."""

    def __init__(self, root: str, image_size: int, crop_scale, seed: int):
        self.folder = datasets.ImageFolder(root)
        self.transform = pretrain_transform(image_size, crop_scale)
        self.seed = seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        index, epoch = key
        for attempt in range(len(self.folder)):
            i = (index + attempt) % len(self.folder)
            path = self.folder.samples[i][0]
            try:
                image = self.folder.loader(path)
            except Exception as e:  # PIL raises many types for bad files
                log.warning("skipping unreadable image %s: %s", path, e)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, i))
                return self.transform(image), attempt > 0
        raise RuntimeError(f"no readable image in {self.folder.root}")


def collate(samples) -> dict:
    images, skipped = zip(*samples)
    return {"images": torch.stack(images), "skipped": torch.tensor(skipped, dtype=torch.bool)}


class GlobalBatchSampler:
    """Yields this process's part of global batch `step` for step in [start_step, total_steps).

    Epoch e visits a permutation seeded by (seed, e); global batch b of it is split into
    process_count contiguous parts (drop_last: a trailing partial batch is never used)."""

    def __init__(self, dataset_len: int, global_batch: int, process_index: int, process_count: int,
                 seed: int, start_step: int, total_steps: int):
        self.n, self.global_batch, self.seed = dataset_len, global_batch, seed
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
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                perm_epoch = epoch
            start = b * self.global_batch + self.offset
            yield [(int(i), epoch) for i in perm[start:start + self.local_batch]]


def build_dataset(root: str, image_size: int, crop_scale, seed: int) -> PretrainImageFolder:
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"data.root '{root}' has no train/ directory; expected "
                                f"{train_dir}/<class>/<image> (the ImageNet layout)")
    return PretrainImageFolder(str(train_dir), image_size, crop_scale, seed)


def build_loader(dataset, sampler: GlobalBatchSampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
