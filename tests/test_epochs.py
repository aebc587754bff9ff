"""Epoch coverage of the input pipelines: every sample once per epoch, the documented remainder
dropped, seeds that do not replay each other, batches in step order after a resume."""
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from xla_trainer.data.pretrain import GlobalBatchSampler
from xla_trainer.data.stream import ShardStream, real_batches
from xla_trainer.data.shards import ImageManifest, ShardInfo, tar_bytes

SHARD_SIZES = [7, 3, 12, 5, 9, 1, 6]  # 43 samples, uneven as real shards are


class KeyStream(ShardStream):
    """The real stream (ranges, buffers, quotas, worker split, resume), yielding sample keys
    instead of decoded pixels: the keys are what is counted here."""

    def _decode(self, item, epoch):
        return item[0]

    def _collate(self, decoded, skipped):
        return decoded


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    infos, n = [], 0
    for i, size in enumerate(SHARD_SIZES):
        keys = [f"{n + j:05d}" for j in range(size)]
        n += size
        members = [(f"{k}.{ext}", data) for k in keys for ext, data in (("jpg", b"x"), ("cls", b"0"))]
        (root / f"shard-{i:06d}.tar").write_bytes(tar_bytes(members))
        infos.append(ShardInfo(f"shard-{i:06d}.tar", size, 0, "", ""))
    return ImageManifest(infos), str(root)


def host_batches(shards, host, hosts, workers, global_batch, epochs=2, start=0, seed=0, buffer=4):
    manifest, root = shards
    steps = manifest.num_samples // global_batch
    stream = KeyStream(manifest, root, None, None, image_size=0, crop_scale=None, seed=seed,
                       local_batch=global_batch // hosts, steps_per_epoch=steps, start_step=start,
                       total_steps=epochs * steps, process_index=host, process_count=hosts,
                       shuffle_buffer=buffer)
    return list(real_batches(DataLoader(stream, batch_size=None, num_workers=workers)))


@pytest.mark.parametrize("hosts,workers,global_batch", [(1, 0, 5), (2, 3, 6), (3, 2, 9)])
def test_each_epoch_reads_every_sample_once_but_the_remainder(shards, hosts, workers, global_batch):
    n = sum(SHARD_SIZES)
    steps = n // global_batch
    per_host = [host_batches(shards, h, hosts, workers, global_batch) for h in range(hosts)]
    assert [len(b) for b in per_host] == [2 * steps] * hosts  # lockstep
    assert all(len(batch) == global_batch // hosts for b in per_host for batch in b)
    orders = []
    for epoch in range(2):
        keys = [k for b in per_host for batch in b[epoch * steps:(epoch + 1) * steps] for k in batch]
        visits = Counter(keys)
        assert max(visits.values()) == 1  # nobody twice
        assert len(visits) == steps * global_batch  # the remainder, N mod global_batch, is not seen
        for b in per_host:  # and each host leaves out at most one local batch of its range
            host_keys = {k for batch in b[epoch * steps:(epoch + 1) * steps] for k in batch}
            assert len(host_keys) >= n // hosts - global_batch // hosts
        orders.append(keys)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("start", [1, 2, 9])
def test_resume_mid_epoch_gives_the_same_batches_in_step_order(shards, start):
    """Three workers and a start that is not a multiple of three: before, the workers' round robin
    returned the batches out of step order after a resume."""
    full = host_batches(shards, 0, 1, 3, 4)
    assert host_batches(shards, 0, 1, 3, 4, start=start) == full[start:]
    assert host_batches(shards, 0, 1, 0, 4) == host_batches(shards, 0, 1, 1, 4)


def test_worker_ranges_tile_the_host_range(shards):
    manifest, root = shards
    stream = KeyStream(manifest, root, None, None, image_size=0, crop_scale=None, seed=3, local_batch=2,
                       steps_per_epoch=manifest.num_samples // 4, start_step=0, total_steps=10,
                       process_index=1, process_count=2, shuffle_buffer=4)
    covered = Counter()
    for w in range(3):
        pieces, quota = stream.worker_range(0, w, 3)
        assert quota == len(range(w, stream.steps_per_epoch, 3)) * 2
        assert sum(stop - first for _, first, stop in pieces) >= quota
        for name, first, stop in pieces:
            covered.update((name, i) for i in range(first, stop))
    assert max(covered.values()) == 1 and sum(covered.values()) in (21, 22)  # 43 split over two hosts


def test_seeds_do_not_replay_each_other(shards):
    """seed + epoch made seed 1's epoch 0 the order of seed 0's epoch 1."""
    sampler = lambda seed: [b for b in GlobalBatchSampler(40, 8, 0, 1, seed=seed, start_step=0, total_steps=10)]
    zero, one = sampler(0), sampler(1)
    assert [i for i, _ in one[0]] != [i for i, _ in zero[5]]
    streams = {s: host_batches(shards, 0, 1, 0, 5, seed=s) for s in (0, 1)}
    steps = sum(SHARD_SIZES) // 5
    assert streams[1][:steps] != streams[0][steps:]
    assert torch.equal(torch.tensor([i for i, _ in zero[0]]),
                       torch.tensor([i for i, _ in sampler(0)[0]]))  # and stay deterministic
