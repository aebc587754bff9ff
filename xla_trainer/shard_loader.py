"""Streaming training input from image shards (and target shards) on local disk or gs://.

Every epoch the shard list is permuted by (seed, epoch) and dealt out to hosts, then to each
host's DataLoader workers. Worker w of W produces the host's batches w, w + W, ... (the order in
which DataLoader returns them), from its shards through a shuffle buffer seeded by (seed, epoch,
host, worker), cycling over its shards if they run short: every host yields exactly
steps_per_epoch batches per epoch, which SPMD's lockstep needs. Resuming at a step skips the
batches before it without decoding them.
"""
import json
import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ImageManifest, iter_samples, jpeg_of, join, label_of
from .targets import TargetManifest, load_npy
from .views import decode_view, image_size_of, sample_view, view_index

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    def __init__(self, images: ImageManifest, image_prefix: str, targets: TargetManifest | None,
                 target_prefix: str | None, *, image_size: int, crop_scale, seed: int, local_batch: int,
                 steps_per_epoch: int, start_step: int, total_steps: int, process_index: int,
                 process_count: int, shuffle_buffer: int):
        self.images, self.image_prefix = images, image_prefix
        self.targets, self.target_prefix = targets, target_prefix
        self.image_size, self.crop_scale, self.seed = image_size, crop_scale, seed
        self.local_batch, self.steps_per_epoch = local_batch, steps_per_epoch
        self.start_step, self.total_steps = start_step, total_steps
        self.process_index, self.process_count = process_index, process_count
        self.shuffle_buffer = shuffle_buffer

    # --- raw samples ------------------------------------------------------------------------
    def _worker_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order = torch.randperm(len(self.images.shards), generator=torch.Generator().manual_seed(self.seed + epoch))
        host = order[self.process_index::self.process_count]
        return [self.images.shards[i].name for i in host[worker::workers].tolist()]

    def _shard_samples(self, name: str):
        """(key, jpeg, stored targets or None, shard, label) of one shard, image and target tars
        read side by side. The target shard lacks keys whose image was unreadable at precompute."""
        images = iter_samples(join(self.image_prefix, name))
        if self.targets is None:
            for key, sample in images:
                yield key, jpeg_of(sample), None, name, label_of(sample)
            return
        target_url = join(self.target_prefix, name)
        for tkey, target in iter_samples(target_url):
            for key, sample in images:
                if key == tkey:
                    yield key, jpeg_of(sample), target, name, label_of(sample)
                    break
                log.warning("image %s in %s has no targets (unreadable at precompute); skipping", key, name)
            else:
                raise RuntimeError(f"target shard {target_url} has key {tkey}, which image shard "
                                   f"{join(self.image_prefix, name)} does not; precompute it again")

    def _raw(self, epoch: int, worker: int, workers: int):
        shards = self._worker_shards(epoch, worker, workers)
        if not shards:
            raise RuntimeError(f"{len(self.images.shards)} shards are too few for {self.process_count} "
                               f"hosts x {workers} workers; use fewer workers or more shards")
        rng = random.Random(f"{self.seed}/{epoch}/{self.process_index}/{worker}")
        buffer = []
        while True:  # cycle: a worker whose shards run short reads them again
            read = 0
            for name in shards:
                for item in self._shard_samples(name):
                    read += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], item = item, buffer[i]
                    yield item
            if read == 0:
                raise RuntimeError(f"shards {shards} hold no readable samples")

    # --- decoded batches --------------------------------------------------------------------
    def _decode(self, item, epoch: int):
        key, jpeg, target, shard, _ = item
        try:
            if target is None:
                width, height = image_size_of(jpeg)
                box, flip = sample_view(self.seed, key, epoch, width, height, self.crop_scale)
                return decode_view(jpeg, box, flip, self.image_size), None
            views = json.loads(target["views.json"])
            k = view_index(self.seed, epoch, key, len(views["flips"]))
            pixels = decode_view(jpeg, tuple(views["boxes"][k]), views["flips"][k], self.image_size)
            scale = load_npy(target["scale.npy"])[k] if "scale.npy" in target else None
            return pixels, (load_npy(target["tokens.npy"])[k], scale)
        except Exception as e:  # a corrupt JPEG, whatever PIL raises
            log.warning("skipping unreadable image %s in shard %s: %s", key, shard, e)
            return None

    def _batch(self, raw, epoch: int) -> dict:
        """Exactly local_batch raw samples per batch, so a resume can skip batches without
        decoding; an unreadable one is replaced by a copy of a readable one and flagged."""
        decoded = [self._decode(next(raw), epoch) for _ in range(self.local_batch)]
        good = next((d for d in decoded if d is not None), None)
        if good is None:
            raise RuntimeError("a whole batch of unreadable images; check the shards")
        skipped = torch.tensor([d is None for d in decoded])
        return self._collate([good if d is None else d for d in decoded], skipped)

    def _collate(self, decoded: list, skipped: torch.Tensor) -> dict:
        good = decoded[0]
        batch = {"images": torch.from_numpy(np.stack([pixels for pixels, _ in decoded])), "skipped": skipped}
        if good[1] is not None:
            batch["targets"] = torch.from_numpy(np.stack([t[0] for _, t in decoded]))
            if good[1][1] is not None:
                batch["target_scale"] = torch.from_numpy(np.stack([t[1] for _, t in decoded]))
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.start_step // self.steps_per_epoch
        while epoch * self.steps_per_epoch < self.total_steps:
            raw = self._raw(epoch, worker, workers)
            first = epoch * self.steps_per_epoch
            for b in range(worker, self.steps_per_epoch, workers):
                step = first + b
                if step >= self.total_steps:
                    return
                if step < self.start_step:  # resume: consume without decoding
                    for _ in range(self.local_batch):
                        next(raw)
                    continue
                yield self._batch(raw, epoch)
            epoch += 1


def build_shard_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    from .data import ignore_sigterm
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_sigterm)
