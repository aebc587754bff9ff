"""The whole data path on gs:// against a real GCS server (fake-gcs-server on 127.0.0.1)."""
import threading

import fsspec
import torch

import pytest

from conftest import run_here, tiny_overrides
from xla_trainer.data.stream import ShardStream
from xla_trainer.data.shards import ImageManifest, make_shards

pytestmark = pytest.mark.slow  # make test-fast leaves it out


def test_make_shards_precompute_and_pretrain_on_gs(embedded_root, gcs_bucket, tmp_path):
    images, targets, out = f"{gcs_bucket}/images", f"{gcs_bucket}/targets", f"{gcs_bucket}/run"
    made = run_here(["make-shards", str(embedded_root / "train"), images, "--shard-size", "100", "--max-side", "64"])
    assert made.returncode == 0, made.stderr[-3000:]
    assert "504 images in 6 shards" in made.stdout

    config = tiny_overrides(embedded_root, out, **{
        "data.source": "shards", "data.shards": images, "targets.prefix": targets, "data.shuffle_buffer": 16})
    pre = run_here(["precompute-targets", *config])
    assert pre.returncode == 0, pre.stderr[-3000:]

    train = run_here(["pretrain", *config, "targets.source=precomputed", "train.stop_at_step=4",
                     "train.ckpt_every=2", "data.num_workers=2"])
    assert train.returncode == 0, train.stderr[-3000:]
    fs = fsspec.filesystem("gs")
    run_files = {p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("gs://"), detail=False)}
    assert {"checkpoints", "metrics.jsonl"} <= run_files
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{out.removeprefix('gs://')}/checkpoints", detail=False)} == {"2", "4"}
    rows = fs.cat(f"{out}/metrics.jsonl").decode().splitlines()
    assert len(rows) == 4 and '"step": 4' in rows[-1]
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(targets.removeprefix("gs://"), detail=False)} >= {
        "manifest.json", "shard-000005.tar", "shard-000005.tar.json"}


def test_loader_survives_a_server_restart_mid_read(embedded_root, gcs_bucket, gcs_server, caplog):
    images = f"{gcs_bucket}/images"
    make_shards(str(embedded_root / "train"), images, 40, max_side=64, workers=1)
    manifest = ImageManifest.load(images)

    def stream():
        return ShardStream(manifest, images, None, None, image_size=16, crop_scale=(0.2, 1.0), seed=0,
                           local_batch=8, steps_per_epoch=manifest.num_samples // 8, start_step=0,
                           total_steps=manifest.num_samples // 8, process_index=0, process_count=1,
                           shuffle_buffer=4)

    reference = [b["images"] for b in stream()]
    got = []
    for i, batch in enumerate(stream()):
        got.append(batch["images"])
        if i == 2:  # shards after the first are still to be read
            gcs_server.stop()
            threading.Timer(1.5, gcs_server.start).start()
    assert len(got) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(reference, got)), "a sample was lost or changed"
    assert gcs_server.running
