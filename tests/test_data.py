"""Input pipeline: per-host split of the global batch, determinism, unreadable images."""
import shutil

import pytest
import torch

from conftest import read_metrics, run_here, tiny_overrides
from xla_trainer.data.pretrain import GlobalBatchSampler, build_dataset, build_loader


def test_hosts_split_each_global_batch_exactly():
    n, gb, steps = 103, 12, 20  # 8 batches per epoch: runs into epoch 2
    single = list(GlobalBatchSampler(n, gb, 0, 1, seed=5, start_step=0, total_steps=steps))
    parts = [list(GlobalBatchSampler(n, gb, h, 3, seed=5, start_step=0, total_steps=steps)) for h in range(3)]
    for step in range(steps):
        joined = parts[0][step] + parts[1][step] + parts[2][step]
        assert joined == single[step] and len(set(joined)) == gb
    epoch0 = [i for batch in single[:8] for i, _ in batch]
    assert len(set(epoch0)) == 96  # no repeats inside an epoch; drop_last leaves 7 out
    assert {e for batch in single for _, e in batch} == {0, 1, 2}
    assert single[0] != single[8]  # the permutation changes with the epoch


def test_resume_position_continues_the_same_order():
    full = list(GlobalBatchSampler(50, 8, 0, 1, seed=1, start_step=0, total_steps=12))
    assert list(GlobalBatchSampler(50, 8, 0, 1, seed=1, start_step=7, total_steps=12)) == full[7:]


def test_augmentation_depends_only_on_sample_and_epoch(embedded_root):
    ds = build_dataset(str(embedded_root), 32, (0.2, 1.0), seed=0)
    a, _ = ds[(3, 0)]
    torch.rand(100)  # global RNG use in between must not matter
    b, _ = ds[(3, 0)]
    c, _ = ds[(3, 1)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_loader_batches_and_workers_agree(embedded_root):
    ds = build_dataset(str(embedded_root), 32, (0.2, 1.0), seed=0)
    sampler = lambda: GlobalBatchSampler(len(ds), 8, 0, 1, seed=0, start_step=0, total_steps=3)
    inline = list(build_loader(ds, sampler(), num_workers=0))
    workers = list(build_loader(ds, sampler(), num_workers=2))
    assert inline[0]["images"].shape == (8, 3, 32, 32)
    for x, y in zip(inline, workers):
        assert torch.equal(x["images"], y["images"])


@pytest.mark.slow  # a subprocess or a whole training: not in the edit loop
def test_unreadable_image_is_skipped_counted_and_named(embedded_root, tmp_path):
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((embedded_root / "train" / "astronaut").glob("*.jpg"))[:16]):
        shutil.copy(src, root / "train" / "a" / f"{i:02d}.jpg")
    bad = root / "train" / "a" / "07.jpg"
    bad.write_bytes(b"not a jpeg at all")
    extra = {"data.source": "imagefolder", "data.root": str(root), "train.epochs": 1}
    result = run_here(["pretrain", *tiny_overrides(root, tmp_path / "out", **extra)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping unreadable image {bad}" in result.stderr
    rows = read_metrics(tmp_path / "out")
    assert len(rows) == 2 and rows[-1]["skipped_images"] == 1
