"""Streaming training input from image shards (and target shards) on local disk or gs://.

Every epoch the shards are permuted by (seed, epoch) and read as one sequence of samples, which is
cut into equal contiguous ranges, one per host, and each host's range into one per DataLoader
worker: a range starts and ends inside a shard where it must (the head of a shard that belongs to
the range before is read without being decoded). Worker w of W produces the host's batches w,
w + W, ... (the order in which DataLoader returns them), from its range through a shuffle buffer
seeded by (seed, epoch, host, worker), and flushes the buffer at the end of its range.

So every epoch reads each sample exactly once, and drops the N mod global_batch samples that do not
fill a global batch: on each host at most local_batch of them, the last ones out of its workers'
shuffle buffers, which differ from epoch to epoch. Every host yields exactly steps_per_epoch
batches per epoch, which SPMD's lockstep needs. Only when shards hold fewer readable samples than
their manifest says (a truncated tar, images without precomputed targets) does a worker run short;
it then reads its range again, with a warning. Resuming at a step skips the batches before it
without decoding them.
"""
import json
import logging
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..seeds import derive_seed
from .shards import ImageManifest, iter_samples, jpeg_of, join, label_of
from ..targets import TargetManifest, load_npy
from .views import CROP_RATIO, decode_view, image_size_of, sample_view, view_index

log = logging.getLogger(__name__)


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part i when n items are cut into `parts` contiguous, near-equal parts."""
    return n * i // parts, n * (i + 1) // parts


class ShardStream(IterableDataset):
    def __init__(self, images: ImageManifest, image_prefix: str, targets: TargetManifest | None,
                 target_prefix: str | None, *, image_size: int, crop_scale, seed: int, local_batch: int,
                 steps_per_epoch: int, start_step: int, total_steps: int, process_index: int,
                 process_count: int, shuffle_buffer: int, crop_ratio=CROP_RATIO):
        self.images, self.image_prefix = images, image_prefix
        self.targets, self.target_prefix = targets, target_prefix
        self.image_size, self.crop_scale, self.crop_ratio, self.seed = image_size, crop_scale, crop_ratio, seed
        self.local_batch, self.steps_per_epoch = local_batch, steps_per_epoch
        self.start_step, self.total_steps = start_step, total_steps
        self.process_index, self.process_count = process_index, process_count
        self.shuffle_buffer = shuffle_buffer

    # --- which samples a worker reads in an epoch ----------------------------------------------
    def worker_range(self, epoch: int, worker: int, workers: int) -> tuple[list[tuple[str, int, int]], int]:
        """([(shard, first, stop), ...], quota): the samples (by position in their shard) of this
        host's worker in an epoch, and how many of them its batches take. The host's range is its
        1/process_count of the epoch's sample sequence; each worker gets the samples of its batches
        plus an equal part of the host's remainder."""
        order = torch.randperm(len(self.images.shards),
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch)))
        shards = [self.images.shards[i] for i in order.tolist()]
        host_start, host_stop = split(sum(s.samples for s in shards), self.process_count, self.process_index)
        quotas = [len(range(w, self.steps_per_epoch, workers)) * self.local_batch for w in range(workers)]
        remainder = host_stop - host_start - sum(quotas)  # < local_batch + 1, never negative
        extra_start, extra_stop = split(remainder, workers, worker)
        start = host_start + sum(quotas[:worker]) + extra_start
        stop = start + quotas[worker] + extra_stop - extra_start
        pieces, offset = [], 0
        for shard in shards:
            first, last = max(start, offset), min(stop, offset + shard.samples)
            if first < last:
                pieces.append((shard.name, first - offset, last - offset))
            offset += shard.samples
        return pieces, quotas[worker]

    # --- raw samples --------------------------------------------------------------------------
    def _shard_samples(self, name: str, first: int, stop: int):
        """(key, jpeg, stored targets or None, shard, label) of samples [first, stop) of one shard
        (positions count the samples that hold an image, as the manifest does), the image and target
        tars read side by side. The target shard lacks keys whose image was unreadable at precompute;
        those are skipped."""
        images = ((key, s) for key, s in iter_samples(join(self.image_prefix, name)) if jpeg_of(s) is not None)
        targets = iter_samples(join(self.target_prefix, name)) if self.targets is not None else None
        pending = next(targets, None) if targets is not None else None
        read = 0
        for position, (key, sample) in enumerate(images):
            if position >= stop:
                return
            read = position + 1
            target = None
            if targets is not None:
                if pending is None or pending[0] != key:
                    if position >= first:
                        log.warning("image %s in %s has no targets (unreadable at precompute); skipping", key, name)
                    continue
                target, pending = pending[1], next(targets, None)
            if position >= first:
                yield key, jpeg_of(sample), target, name, label_of(sample)
        if pending is None:
            return
        expected = next((s.samples for s in self.images.shards if s.name == name), 0)
        if read < expected:  # the image shard ended early (iter_samples warned): it is damaged, not the targets
            raise RuntimeError(f"image shard {join(self.image_prefix, name)} ends after {read} of its {expected} "
                               f"images (truncated or corrupt; its targets go on at key {pending[0]}); rebuild it "
                               f"with `xla-trainer make-shards` and the arguments that wrote it (the targets "
                               f"still fit the same shards), or copy it again")
        raise RuntimeError(f"target shard {join(self.target_prefix, name)} has key {pending[0]}, which "
                           f"image shard {join(self.image_prefix, name)} does not; precompute it again")

    def _raw(self, epoch: int, worker: int, workers: int):
        """The worker's range once, shuffled through the buffer, which is flushed at the end; again
        (with a warning) if it held fewer readable samples than the worker's batches need."""
        pieces, quota = self.worker_range(epoch, worker, workers)
        rng = random.Random(derive_seed(self.seed, "buffer", epoch, self.process_index, worker))
        produced = 0
        while True:
            buffer, read = [], 0
            for piece in pieces:
                for item in self._shard_samples(*piece):
                    read += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], item = item, buffer[i]
                    yield item
            rng.shuffle(buffer)
            yield from buffer
            produced += read
            if produced >= quota:
                return
            if read == 0:
                raise RuntimeError(f"shard ranges {pieces} hold no readable samples")
            log.warning("epoch %d, host %d, worker %d: its shard ranges %s held %d readable samples of the "
                        "%d its batches need; reading them again", epoch, self.process_index, worker,
                        pieces, read, quota)

    # --- decoded batches --------------------------------------------------------------------
    def _decode(self, item, epoch: int):
        key, jpeg, target, shard, _ = item
        try:
            if target is None:
                width, height = image_size_of(jpeg)
                box, flip = sample_view(self.seed, key, epoch, width, height, self.crop_scale,
                                         self.crop_ratio)
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
        """Per epoch, this worker's batches b = worker, worker + W, ... One placeholder (None) for
        each of its slots that is not a batch to train on (b past the epoch's end, or before the
        resumed step), so that every worker fills the same number of slots per epoch and
        DataLoader's round robin over the workers returns the batches in step order; the loader
        drops the placeholders (real_batches)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.start_step // self.steps_per_epoch
        slots = -(-self.steps_per_epoch // workers) * workers
        while epoch * self.steps_per_epoch < self.total_steps:
            raw = self._raw(epoch, worker, workers)
            first = epoch * self.steps_per_epoch
            for b in range(worker, slots, workers):
                step = first + b
                if step >= self.total_steps:
                    return
                if b >= self.steps_per_epoch:
                    yield None
                elif step < self.start_step:  # resume: consume without decoding
                    for _ in range(self.local_batch):
                        next(raw)
                    yield None
                else:
                    yield self._batch(raw, epoch)
            epoch += 1


def real_batches(loader):
    """The batches of a ShardStream loader, without its placeholders."""
    return (batch for batch in loader if batch is not None)


def ignore_stop_signals(_worker_id: int):
    """Loader workers leave SIGTERM and SIGINT to the trainer, which finishes its step and saves
    first; they end with it. (Ctrl-C in a terminal reaches the whole process group: a worker that
    took it would die, and the trainer's next batch fail.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False):
    return real_batches(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                   prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals))
