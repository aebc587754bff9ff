"""Image shards, precomputed targets and the streaming loader, on local paths."""
import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_metrics, run_cli, run_here, tiny_overrides
from fake_cloud import Cloud, supervise_cmd
from xla_trainer.config import load_config
from xla_trainer.data.stream import ShardStream, real_batches
from xla_trainer.data.shards import ImageManifest, iter_samples, make_shards, tar_bytes
from xla_trainer.targets import TargetManifest, build_teacher, dequantize, load_npy
from xla_trainer.data.views import decode_view, sample_view

pytestmark = pytest.mark.slow  # make test-fast leaves it out

SHARD_SIZE = 50


def shard_overrides(data_root, out, shards, targets=None, **extra):
    values = {"data.source": "shards", "data.shards": str(shards), "data.shuffle_buffer": 16}
    if targets:
        values.update({"targets.source": "precomputed", "targets.prefix": str(targets)})
    values.update(extra)
    return tiny_overrides(data_root, out, **values)


def precompute(data_root, shards, targets, **extra):
    args = shard_overrides(data_root, "unused", shards, **{"targets.prefix": str(targets), **extra})
    return run_here(["precompute-targets", *args])


@pytest.fixture(scope="module")
def image_shards(embedded_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "images"
    make_shards(str(embedded_root / "train"), str(out), SHARD_SIZE, max_side=64, quality=90, workers=2)
    return out


def precomputed(embedded_root, image_shards, out, dtype):
    result = precompute(embedded_root, image_shards, out, **{
        "targets.num_views": 2, "targets.dtype": dtype, "runtime.precision": "fp32"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fp16_targets(embedded_root, image_shards, tmp_path_factory):
    return precomputed(embedded_root, image_shards, tmp_path_factory.mktemp("targets") / "fp16", "float16")


@pytest.fixture(scope="module")
def int8_targets(embedded_root, image_shards, tmp_path_factory):
    return precomputed(embedded_root, image_shards, tmp_path_factory.mktemp("targets") / "int8", "int8")


def test_make_shards_manifest(embedded_root, image_shards):
    manifest = ImageManifest.load(str(image_shards))
    n_images = len(list((embedded_root / "train").rglob("*.jpg")))
    assert manifest.num_samples == n_images and len(manifest.shards) == -(-n_images // SHARD_SIZE)
    assert manifest.classes == sorted(p.name for p in (embedded_root / "train").iterdir())
    keys = []
    for info in manifest.shards:
        blob = (image_shards / info.name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == info.sha256 and len(blob) == info.bytes
        samples = list(iter_samples(str(image_shards / info.name)))
        assert len(samples) == info.samples
        for key, sample in samples:
            assert set(sample) == {"jpg", "cls"}
            assert max(Image.open(io.BytesIO(sample["jpg"])).size) <= 64
            assert 0 <= int(sample["cls"]) < len(manifest.classes)
        keys += [k for k, _ in samples]
    assert len(set(keys)) == n_images
    labels = [int(s["cls"]) for _, s in iter_samples(str(image_shards / manifest.shards[0].name))]
    assert len(set(labels)) > 3  # shuffled before sharding: classes are mixed


def test_index_shards_of_existing_webdataset(image_shards, tmp_path):
    """Shards written by another tool (here: ours, manifest removed) get the same index back."""
    shards = copy_shards(image_shards, tmp_path / "shards")
    (shards / "manifest.json").unlink()
    result = run_cli(["index-shards", str(shards)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert ImageManifest.load(str(shards)).shards == ImageManifest.load(str(image_shards)).shards


@pytest.mark.parametrize("dtype,min_cos", [("float16", 0.9999), ("int8", 0.999)])
def test_precomputed_targets_match_online_teacher(request, embedded_root, image_shards, tmp_path, dtype, min_cos):
    """The stored view reproduces the crop and flip, and its stored targets are the online
    teacher's on that very crop."""
    prefix = request.getfixturevalue("fp16_targets" if dtype == "float16" else "int8_targets")
    manifest = TargetManifest.load(str(prefix))
    assert (manifest.num_views, manifest.dtype, manifest.image_size, manifest.grid) == (2, dtype, 32, [4, 4])
    cfg = load_config(None, shard_overrides(embedded_root, tmp_path, image_shards))
    teacher = build_teacher(cfg)
    name = manifest.shards[0].name
    images = dict(iter_samples(str(image_shards / name)))
    cosines = []
    for key, target in list(iter_samples(str(prefix / name)))[:6]:
        views = json.loads(target["views.json"])
        scale = load_npy(target["scale.npy"]) if "scale.npy" in target else None
        stored = dequantize(load_npy(target["tokens.npy"]), scale)
        assert stored.shape == (2, 17, 64)
        w, h = Image.open(io.BytesIO(images[key]["jpg"])).size
        for k in range(2):
            box, flip = tuple(views["boxes"][k]), views["flips"][k]
            assert (box, flip) == sample_view(cfg.train.seed, key, k, w, h, cfg.data.crop_scale)
            pixels = torch.from_numpy(decode_view(images[key]["jpg"], box, flip, 32))[None]
            online = teacher(pixels)[0]
            cosines += torch.nn.functional.cosine_similarity(online, torch.from_numpy(stored[k]), dim=-1).tolist()
    assert min(cosines) >= min_cos


@pytest.mark.xla
def test_precompute_on_a_4_device_xla_mesh_matches_cpu(embedded_root, image_shards, fp16_targets, tmp_path):
    out = tmp_path / "xla"
    args = shard_overrides(embedded_root, "unused", image_shards, **{
        "targets.prefix": str(out), "targets.num_views": 2, "runtime.precision": "fp32",
        "runtime.backend": "xla", "targets.batch_size": 8})
    result = run_cli(["precompute-targets", *args], env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("shard-000000.tar", "shard-000010.tar"):
        xla, cpu = dict(iter_samples(str(out / name))), dict(iter_samples(str(fp16_targets / name)))
        assert list(xla) == list(cpu)
        for key in cpu:
            assert xla[key]["views.json"] == cpu[key]["views.json"]
            a, b = load_npy(xla[key]["tokens.npy"]).astype(np.float32), load_npy(cpu[key]["tokens.npy"]).astype(np.float32)
            assert np.allclose(a, b, atol=2e-2, rtol=1e-2)


def test_int8_targets_take_about_half_the_bytes(fp16_targets, int8_targets):
    fp16 = TargetManifest.load(str(fp16_targets)).bytes_per_image
    int8 = TargetManifest.load(str(int8_targets)).bytes_per_image
    assert 0.4 * fp16 < int8 < 0.85 * fp16


def test_streams_split_shards_per_host_and_keep_lockstep(image_shards):
    manifest = ImageManifest.load(str(image_shards))
    steps_per_epoch = manifest.num_samples // 8

    def keys(process_index, process_count, start=0):
        stream = ShardStream(manifest, str(image_shards), None, None, image_size=16, crop_scale=(0.2, 1.0),
                             seed=0, local_batch=8 // process_count, steps_per_epoch=steps_per_epoch,
                             start_step=start, total_steps=steps_per_epoch + 3, process_index=process_index,
                             process_count=process_count, shuffle_buffer=8)
        return [b["images"] for b in real_batches(stream)]

    one = keys(0, 1)
    assert len(one) == steps_per_epoch + 3 and one[0].shape == (8, 3, 16, 16)
    hosts = [keys(h, 2) for h in range(2)]
    assert [len(h) for h in hosts] == [steps_per_epoch + 3] * 2 and hosts[0][0].shape == (4, 3, 16, 16)
    assert not torch.equal(hosts[0][0], hosts[1][0])
    resumed = keys(0, 1, start=5)
    assert len(resumed) == len(one) - 5
    for a, b in zip(one[5:], resumed):
        assert torch.equal(a, b)


def test_pretrain_on_precomputed_targets_resumes_exactly(embedded_root, image_shards, fp16_targets, tmp_path):
    common = shard_overrides(embedded_root, tmp_path / "a", image_shards, fp16_targets)
    full = run_here(["pretrain", *common, "train.stop_at_step=6"])
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = shard_overrides(embedded_root, tmp_path / "b", image_shards, fp16_targets)
    assert run_here(["pretrain", *resumed, "train.stop_at_step=3"]).returncode == 0
    second = run_here(["pretrain", *resumed, "train.stop_at_step=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    assert a[0]["loss"] != pytest.approx(a[-1]["loss"], abs=1e-3)


def test_pretrain_online_teacher_on_shards(embedded_root, image_shards, tmp_path):
    result = run_here(["pretrain", *shard_overrides(embedded_root, tmp_path, image_shards), "train.stop_at_step=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_metrics(tmp_path)) == 3


# --- faults and bad input -------------------------------------------------------------------
def copy_shards(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_member(shard_path, member_suffix, new_bytes):
    """Replace the bytes of the first member ending in member_suffix; returns its key."""
    with tarfile.open(shard_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    name = next(n for n, _ in members if n.endswith(member_suffix))
    members = [(n, new_bytes if n == name else data) for n, data in members]
    shard_path.write_bytes(tar_bytes(members))
    return name.split(".")[0]


def test_corrupt_jpeg_in_a_shard_is_skipped_counted_and_named(embedded_root, image_shards, tmp_path):
    shards = copy_shards(image_shards, tmp_path / "shards")
    key = rewrite_member(shards / "shard-000000.tar", ".jpg", b"\xff\xd8 definitely not a jpeg")
    out = tmp_path / "out"
    # one epoch through a 1-sample shuffle buffer reads every sample once
    extra = {"train.epochs": 1, "data.shuffle_buffer": 1}
    result = run_here(["pretrain", *shard_overrides(embedded_root, out, shards, **extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping unreadable image {key} in shard shard-000000.tar" in result.stderr
    assert read_metrics(out)[-1]["skipped_images"] == 1


def test_truncated_shard_ends_with_a_warning(embedded_root, image_shards, tmp_path):
    shards = copy_shards(image_shards, tmp_path / "shards")
    victim = shards / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2 + 100])
    out = tmp_path / "out"
    result = run_here(["pretrain", *shard_overrides(embedded_root, out, shards, **{"train.epochs": 1})])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"shard {victim} is truncated or corrupt" in result.stderr
    assert len(read_metrics(out)) == ImageManifest.load(str(shards)).num_samples // 8


def bad_targets_run(embedded_root, image_shards, targets, tmp_path, **extra):
    result = run_here(["pretrain", *shard_overrides(embedded_root, tmp_path / "out", image_shards, targets, **extra)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()
    return result.stderr


def test_missing_target_shard_is_named(embedded_root, image_shards, fp16_targets, tmp_path):
    targets = copy_shards(fp16_targets, tmp_path / "targets")
    (targets / "shard-000002.tar").unlink()
    err = bad_targets_run(embedded_root, image_shards, targets, tmp_path)
    assert f"target shard {targets}/shard-000002.tar is missing" in err


def test_targets_of_other_images_are_named(embedded_root, image_shards, fp16_targets, tmp_path):
    """Shards dealt with another seed: same names and counts, other keys in each."""
    other = tmp_path / "other"
    make_shards(str(embedded_root / "train"), str(other), SHARD_SIZE, max_side=64, seed=1, workers=1)
    manifest = json.loads((other / "manifest.json").read_text())
    for info in manifest["shards"]:  # keep the keys, change which images: a counts-only check passes
        info["keys_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    err = bad_targets_run(embedded_root, other, fp16_targets, tmp_path)
    assert f"target shard {fp16_targets}/shard-000000.tar has 50 samples with other keys than image shard" in err


def test_targets_of_another_teacher_or_resolution_fail_before_training(embedded_root, image_shards,
                                                                         fp16_targets, tmp_path):
    err = bad_targets_run(embedded_root, image_shards, fp16_targets, tmp_path,
                          **{"backbone.image_size": 64, "backbone.patch_size": 16})
    assert "were made by teacher demo-ViT-T-8 (None) at 32 px, but the config expects demo-ViT-T-8 (None) at 64 px" in err
    err = bad_targets_run(embedded_root, image_shards, fp16_targets, tmp_path, **{"teacher.arch": "ViT-B-16"})
    assert "but the config expects ViT-B-16" in err


def test_precompute_under_the_supervisor_survives_two_reclaims(embedded_root, image_shards, fp16_targets, tmp_path):
    """tpu_scripts/supervise.sh over precompute-targets on the fake cloud (tests/fake_gcloud.py),
    which reclaims the slice once 2 and once 5 target shards are committed (the job, which has no
    SIGTERM handler, dies mid-shard): the relaunches skip the finished shards, the targets end
    byte-identical to an uninterrupted job's, and no interrupted write is left behind."""
    out = tmp_path / "bucket" / "targets"
    cloud = Cloud(tmp_path, [{"kind": "preempt", "at_step": 2}, {"kind": "preempt", "at_step": 5}],
                  progress_glob=str(out / "shard-*.tar.json"))
    args = shard_overrides(embedded_root, "unused", image_shards, **{
        "targets.prefix": str(out), "targets.num_views": 2, "runtime.precision": "fp32", "targets.batch_size": 4})
    state = tmp_path / "supervisor"
    try:
        p = subprocess.run(supervise_cmd(state, "precompute-targets", *args), env=cloud.env, capture_output=True,
                           text=True, timeout=600)
    finally:
        cloud.tear_down()
    assert p.returncode == 0, p.stderr[-5000:]
    assert [e.split()[0] for e in cloud.lines("events.log")] == ["preempt", "preempt"]
    assert json.loads((state / "status.json").read_text())["restarts"] == 2
    assert cloud.slice() is None  # deleted once the manifest was there
    names = sorted(p.name for p in fp16_targets.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (fp16_targets / name).read_bytes(), name
    assert not list(out.glob(".*.tmp-*"))
