"""The evaluations: fine-tuning and probes on the real XLA path (4 CPU devices), k-NN under DDP
(gloo, 2 processes) against 1 process, and the k-NN vote and mixup pieces against references."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xla_runs
from conftest import REPO, read_metrics, run_here, tiny_eval_overrides
from xla_trainer_models.backbones.vit import ViTClassifier, ViTConfig
from xla_trainer.config import load_config
from xla_trainer.data.eval import MixCollate
from xla_trainer.evaluate import neighbours_step, vote_step
from xla_trainer.pretrained import read_state_dict

pytestmark = pytest.mark.slow  # make test-fast leaves it out


def val_images(root) -> int:
    return sum(1 for _ in Path(root, "val").rglob("*.png"))


def summary(stdout: str, mode: str) -> dict:
    m = re.search(rf"{mode}: top-1 ([\d.]+)%, top-5 ([\d.]+)% on (\d+) val images", stdout)
    assert m, stdout[-2000:]
    return {"top1": float(m.group(1)), "top5": float(m.group(2)), "images": int(m.group(3))}


@pytest.fixture(scope="module")
def on_four_xla_devices(digits_root, tmp_path_factory):
    """The XLA evaluations of this file in one process on 4 CPU devices (tests/xla_runs.py): the
    fine-tuning, and each probe on a frozen random encoder saved as a timm state_dict.
    name -> (output_dir, what the run gave); and the encoder's weights."""
    tmp = tmp_path_factory.mktemp("xla_evals")
    torch.manual_seed(1)
    encoder = ViTClassifier(ViTConfig(size="tiny", image_size=32, patch_size=8, width=32, depth=2, heads=2)).state_dict()
    torch.save(encoder, tmp / "encoder.pth")
    xla = {"runtime.backend": "xla"}
    runs = {"finetune": ["finetune", *tiny_eval_overrides(digits_root, tmp / "finetune", **xla, **{
        "train.epochs": 3, "optim.base_lr": 1e-2, "optim.warmup_epochs": 0.5})]}
    for mode in ("linprobe", "attnprobe"):
        runs[mode] = [mode, "--config", f"configs/{mode}/demo.yaml", *tiny_eval_overrides(digits_root, tmp / mode, **xla, **{
            "train.init": tmp / "encoder.pth", "train.epochs": 2, "probe.heads": 2})]
    done = xla_runs.run(4, list(runs.values()), tmp / "spec.json")
    return {name: (tmp / name, result) for name, result in zip(runs, done)}, encoder


@pytest.mark.xla
def test_finetune_on_four_xla_devices(digits_root, on_four_xla_devices):
    """Three epochs on a 4-device mesh with the demo recipe (RandAugment, erasing, mixup, cutmix,
    layer decay): every val image is counted once (the last val batch is padded), nothing
    recompiles after the first epoch, the best epoch's checkpoint is kept apart from the last."""
    out, result = on_four_xla_devices[0]["finetune"]
    assert result.returncode == 0, result.stderr[-3000:]
    final = summary(result.stdout, "finetune")
    rows = read_metrics(out)
    val = [r for r in rows if r.get("group") == "val"]
    train = [r for r in rows if "group" not in r]
    steps_per_epoch = val[0]["step"]
    assert [r["epoch"] for r in val] == [1, 2, 3] and val[-1]["step"] == 3 * steps_per_epoch
    assert all(r["val_images"] == val_images(digits_root) for r in val) and final["images"] == val_images(digits_root)
    assert final["top1"] == pytest.approx(val[-1]["val_top1"], abs=0.01)
    best = max(val, key=lambda r: r["val_top1"])
    assert val[-1]["best_top1"] == best["val_top1"]
    assert f"checkpoint {out}/best/checkpoints/{best['step']})" in result.stdout
    assert (out / "checkpoints" / str(3 * steps_per_epoch)).is_dir()  # the last one
    after_first_eval = [r["compiles"] for r in train if r["step"] > steps_per_epoch]
    assert len(set(after_first_eval)) == 1, after_first_eval
    assert val[-1]["val_loss"] < val[0]["val_loss"] < 2.4  # a tiny ViT from scratch: slow, but learning


@pytest.mark.xla
@pytest.mark.parametrize("mode", ["linprobe", "attnprobe"])
def test_probe_trains_on_frozen_encoder(on_four_xla_devices, mode):
    """A probe on 4 XLA devices trains on a frozen random encoder loaded from a timm state_dict:
    the encoder's weights come out of the run unchanged, the probe's val loss falls."""
    (out, result), encoder = on_four_xla_devices[0][mode], on_four_xla_devices[1]
    assert result.returncode == 0, result.stderr[-3000:]
    summary(result.stdout, mode)
    val = [r for r in read_metrics(out) if r.get("group") == "val"]
    assert len(val) == 2 and val[1]["val_loss"] < val[0]["val_loss"]
    saved = read_state_dict(str(out))
    for key, value in encoder.items():
        assert torch.equal(saved[f"encoder.{key}"], value), key


def test_knn_two_processes_match_one(digits_root, tmp_path):
    """k-NN under DDP: each process encodes its half of every padded batch and the bank is
    gathered, so 2 gloo processes find exactly the single process's neighbours."""
    args = tiny_eval_overrides(digits_root, tmp_path / "one", **{"runtime.backend": "cpu", "train.eval_batch": 64})
    one = run_here(["knn", *args])
    assert one.returncode == 0, one.stderr[-3000:]
    args = tiny_eval_overrides(digits_root, tmp_path / "two", **{"runtime.backend": "cpu", "train.eval_batch": 64})
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "xla_trainer", "knn", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = summary(one.stdout, "knn"), summary(two.stdout, "knn")
    assert a == b and a["images"] == val_images(digits_root) and a["top1"] > 30
    assert read_metrics(tmp_path / "two")[0]["val_top1"] == pytest.approx(a["top1"], abs=0.01)


def test_knn_votes_match_brute_force():
    """Top-k merged chunk by chunk (padding rows masked) equals a top-k over the whole bank; the
    votes are exp(cos / T) summed per class."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    labels, valid = torch.randint(0, 4, (30,)), torch.arange(30) < 25  # the last 5 rows: padding
    k, T = 5, 0.1
    sims, near = torch.full((6, k), float("-inf")), torch.zeros(6, k, dtype=torch.long)
    for chunk in range(3):
        rows = slice(10 * chunk, 10 * chunk + 10)
        sims, near = neighbours_step(q, keys[rows], labels[rows], valid[rows], sims, near, k=k)
    ref_sims, ref_index = (q @ keys[:25].T).topk(k, dim=1)
    assert torch.allclose(sims, ref_sims) and torch.equal(near, labels[ref_index])
    votes = torch.zeros(6, 4)
    for i in range(6):
        for j in range(k):
            votes[i, labels[ref_index[i, j]]] += torch.exp(ref_sims[i, j] / T)
    truth, row_valid = torch.randint(0, 4, (6,)), torch.tensor([True] * 5 + [False])
    zero = torch.zeros(())
    counts = vote_step(sims, near, truth, row_valid, {"top1": zero, "top5": zero, "count": zero},
                       num_classes=4, temperature=T)
    assert counts["top1"] == (votes.argmax(1) == truth)[:5].sum() and counts["count"] == 5
    assert counts["top5"] == 5  # 4 classes: the top 5 hold every class


def test_mixup_targets_are_soft_and_sum_to_one():
    cfg = load_config("configs/finetune/demo.yaml")
    images = [(torch.rand(3, 8, 8), label, 0) for label in (0, 1, 2, 3)]
    batch = MixCollate(cfg, num_classes=10)(images)
    assert batch["images"].shape == (4, 3, 8, 8) and batch["targets"].shape == (4, 10)
    assert torch.allclose(batch["targets"].sum(1), torch.ones(4))
    assert (batch["targets"] > 0.5).sum() <= 4 and batch["targets"].min() > 0  # smoothing 0.1
    cfg.augment.mixup = cfg.augment.cutmix = 0.0
    plain = MixCollate(cfg, num_classes=10)(images)["targets"]
    assert torch.allclose(plain.argmax(1), torch.arange(4)) and plain.max() == pytest.approx(0.91)


def test_bad_init_fails_before_any_work(digits_root, tmp_path):
    args = tiny_eval_overrides(digits_root, tmp_path, **{"runtime.backend": "cpu"})
    result = run_here(["finetune", *args, "train.init=/no/such/run"])
    assert result.returncode == 2
    assert "train.init: /no/such/run: no such file or directory" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def digit_shards(digits_root, tmp_path_factory):
    from xla_trainer.data.shards import make_shards
    prefix = tmp_path_factory.mktemp("digit-shards")
    make_shards(str(digits_root / "train"), str(prefix / "train"), 300, workers=1)  # 5 shards
    make_shards(str(digits_root / "val"), str(prefix / "val"), 100, workers=1)  # 4 shards
    return prefix


def test_labelled_shards_feed_probe_and_knn(digits_root, digit_shards, tmp_path):
    """Labelled webdataset shards (make-shards of train/ and val/): a probe trains from the
    streaming loader with 2 workers; k-NN over 2 processes, each reading its own val shards
    padded to the same batch count, still counts every val image once."""
    shards = {"data.source": "shards", "data.shards": digit_shards, "runtime.backend": "cpu"}
    args = tiny_eval_overrides(digits_root, tmp_path / "probe", **shards, **{"data.num_workers": 2})
    probe = run_here(["linprobe", "--config", "configs/linprobe/demo.yaml", *args])
    assert probe.returncode == 0, probe.stderr[-3000:]
    rows = read_metrics(tmp_path / "probe")
    train_images = sum(1 for _ in Path(digits_root, "train").rglob("*.png"))
    assert [r["step"] for r in rows if "group" not in r][-1] == train_images // 64  # one epoch
    assert [r["val_images"] for r in rows if r.get("group") == "val"] == [val_images(digits_root)]
    args = tiny_eval_overrides(digits_root, tmp_path / "knn", **shards, **{"train.eval_batch": 64})
    knn = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "xla_trainer", "knn", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert knn.returncode == 0, knn.stderr[-3000:]
    result = summary(knn.stdout, "knn")
    assert result["images"] == val_images(digits_root) and result["top1"] > 30
