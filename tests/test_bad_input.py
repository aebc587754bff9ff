"""Every bad number and path is exit 2 (one `xla-trainer: error:` line naming the key or path and
the fix) before anything is built or written; a damaged image is skipped and named, a damaged
data set stops the command at startup."""
import dataclasses
import logging
import re
import shutil
import typing

import pytest

from conftest import TOY_CONFIG, fails_cleanly, tiny_eval_overrides, tiny_overrides
from xla_trainer.cli import eval_default, main
from xla_trainer.config import _BOUND, Config, ConfigError, load_config, registry

GARBAGE = b"\xff\xd8 not an image at all"
DEFAULTS = {"pretrain": TOY_CONFIG, "linprobe": eval_default("linprobe")}  # a config file of each kind of task


def written(out) -> set[str]:
    """The files under `out`, the run lock aside (a command may hold it while it checks its data)."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != ".xla-trainer.lock"}


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model, a teacher or a classifier fails the test: each check must come first."""
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was found")
    for target in ("xla_trainer.pretrain.build_job", "xla_trainer.evaluate.build_classifier",
                   "xla_trainer.visualize.build_encoder", "xla_trainer.targets.build_teacher"):
        monkeypatch.setattr(target, built)


# --- numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.global_batch=0", "config key 'train.global_batch' must be >= 1, got 0"),
    ("train.global_batch=-8", "config key 'train.global_batch' must be >= 1, got -8"),
    ("optim.base_lr=nan", "config key 'optim.base_lr' must be a finite number, got 'nan'"),
    ("optim.lr=.inf", "config key 'optim.lr' must be a finite number, got inf"),
    ("optim.base_lr=-1e-4", "config key 'optim.base_lr' must be >= 0, got -0.0001"),
    ("train.epochs=0", "'train.epochs' must be >= 1"),
    ("train.accum_steps=0", "'train.accum_steps' must be >= 1"),
    ("train.log_every=0", "'train.log_every' must be >= 1"),
    ("train.ckpt_every=-1", "'train.ckpt_every' must be >= 1"),
    ("train.keep_checkpoints=-1", "'train.keep_checkpoints' must be >= 0 (0 keeps all), got -1"),
    ("train.max_skipped_steps=0", "'train.max_skipped_steps' must be >= 1"),
    ("train.stop_at_step=0", "'train.stop_at_step' must be >= 1 (null for none)"),
    ("train.profile_steps=[4,2]", "'train.profile_steps' must be [first, last) with first < last, each >= 0"),
    ("data.shuffle_buffer=0", "'data.shuffle_buffer' must be >= 1"),
    ("data.num_workers=-2", "'data.num_workers' must be >= -1 (-1: one per core), got -2"),
    ("data.crop_scale=[0.5,0.2]", "'data.crop_scale' must be [min, max] with min <= max, each in (0, 1]"),
    ("data.crop_scale=[0,1]", "'data.crop_scale' must be [min, max] with min <= max, each in (0, 1], got [0, 1]"),
    ("data.crop_ratio=[0,1]", "'data.crop_ratio' must be [min, max] with min <= max, each > 0"),
    ("data.crop_ratio=[1]", "'data.crop_ratio' must be [min, max]"),
    ("targets.batch_size=0", "'targets.batch_size' must be >= 1"),
    ("targets.num_views=0", "'targets.num_views' must be >= 1"),
    ("optim.weight_decay=-0.05", "'optim.weight_decay' must be >= 0"),
    ("optim.min_lr=-1", "'optim.min_lr' must be >= 0"),
    ("optim.warmup_epochs=-1", "'optim.warmup_epochs' must be >= 0"),
    ("optim.warmup_from=1.5", "'optim.warmup_from' must be in [0, 1] (a fraction of the peak lr), got 1.5"),
    ("optim.clip_grad=0", "'optim.clip_grad' must be > 0 (null for none), got 0.0"),
    ("optim.betas=[0.9,1.0]", "'optim.betas' must be two numbers, each in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[0.9]", "'optim.betas' must be two numbers"),
    ("optim.betas=[a,b]", "'optim.betas' must be two numbers"),
    ("runtime.slices=0", "'runtime.slices' must be >= 1"),
    ("backbone.width=0", "'backbone.width' must be >= 1, got 0"),
    ("backbone.patch_size=0", "'backbone.patch_size' must be >= 1"),
    ("backbone.heads=-1", "'backbone.heads' must be >= 1"),
    ("backbone.drop_path=1", "'backbone.drop_path' must be in [0, 1)"),
    ("objective.decoder_depth=0", "'objective.decoder_depth' must be >= 1"),
    ("objective.segments=[0,2]", "'objective.segments' must be two numbers, each >= 1"),
    ("train.allow_resume_change=[train.global_bach]",
     "train.allow_resume_change: unknown config key 'train.global_bach'; did you mean 'train.global_batch'?"),
])
def test_a_bad_pretraining_number_is_exit_2_before_anything(override, message, tmp_path, capsys, nothing_built):
    out = tmp_path / "out"
    err = fails_cleanly(capsys, ["pretrain", f"train.output_dir={out}", "runtime.backend=cpu", override])
    assert message in err and not out.exists()


@pytest.mark.parametrize("override,message", [
    ("train.eval_batch=0", "'train.eval_batch' must be >= 1"),
    ("train.eval_every=0", "'train.eval_every' must be >= 1"),
    ("probe.k=0", "'probe.k' must be >= 1"),
    ("probe.temperature=0", "'probe.temperature' must be > 0"),
    ("probe.heads=0", "'probe.heads' must be >= 1"),
    ("optim.momentum=1", "'optim.momentum' must be in [0, 1)"),
    ("optim.layer_decay=0", "'optim.layer_decay' must be in (0, 1] (1 = off)"),
    ("augment.mixup=-0.8", "'augment.mixup' must be >= 0 (0 = off)"),
    ("augment.label_smoothing=1", "'augment.label_smoothing' must be in [0, 1)"),
    ("augment.random_erasing=2", "'augment.random_erasing' must be in [0, 1] (a probability)"),
    ("data.eval_resize=0", "'data.eval_resize' must be >= 1"),
    ("train.ema=nan", "'train.ema' must be a finite number"),
])
def test_a_bad_evaluation_number_is_exit_2_before_anything(override, message, digits_root, tmp_path, capsys,
                                                             nothing_built):
    out = tmp_path / "out"
    err = fails_cleanly(capsys, ["linprobe", *tiny_eval_overrides(digits_root, out), override])
    assert message in err and not out.exists()


def _sections(task):
    """(prefix, dataclass) of every section `task` reads, each registered entry of a plug-in section."""
    sections = Config(task=task)
    for f in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(getattr(sections, f.name)) or not sections.takes(f.name):
            continue
        kind = f.metadata.get("registry")
        entries = [registry(kind).get(n) for n in registry(kind).names()] if kind else [None]
        for entry in entries:
            yield f.name, (entry.Config if entry else f.default_factory), (entry.name if entry else None)


def _float_keys():
    for task in DEFAULTS:
        for section, cls, entry in _sections(task):
            for f in dataclasses.fields(cls):
                if float in (f.type, *typing.get_args(f.type)) and Config(task=task).takes(f"{section}.{f.name}"):
                    yield task, section, entry, f.name


@pytest.mark.parametrize("task,section,entry,name", list(_float_keys()))
def test_no_float_key_takes_nan_or_inf(task, section, entry, name):
    choose = [f"{section}.name={entry}"] if entry else []
    for value in ("nan", "inf", "-.inf"):
        with pytest.raises(ConfigError, match=f"config key '{section}.{name}' must be a finite number"):
            load_config(DEFAULTS[task], [*choose, f"{section}.{name}={value}"], task)


def _outside(spec: str):
    """A number just outside a BOUNDS spec's interval."""
    b = _BOUND.fullmatch(spec)
    bad = float(b["min"]) - (b["op"] == ">=") if b["op"] else float(b["hi"]) + (b["right"] == "]")
    return int(bad) if bad.is_integer() else bad


@pytest.mark.parametrize("task", list(DEFAULTS))
def test_every_bound_parses_names_a_key_and_refuses_a_value_outside(task):
    """The BOUNDS of every section, plug-in entries' included: each spec parses, names a key of its
    section, and a value just outside it is a ConfigError naming that key."""
    checked = 0
    for section, cls, entry in _sections(task):
        names = {f.name: f for f in dataclasses.fields(cls)}
        for name, spec in getattr(cls, "BOUNDS", {}).items():
            assert name in names and _BOUND.fullmatch(spec), f"{cls.__name__}.BOUNDS[{name!r}] = {spec!r}"
            if not Config(task=task).takes(f"{section}.{name}"):
                continue
            bad = _outside(spec)
            value = f"[{bad}, {bad}]" if list in (names[name].type, *typing.get_args(names[name].type)) else bad
            choose = [f"{section}.name={entry}"] if entry else []
            with pytest.raises(ConfigError, match=re.escape(f"config key '{section}.{name}' must be")):
                load_config(DEFAULTS[task], [*choose, f"{section}.{name}={value}"], task)
            checked += 1
    assert checked > 30


# --- paths ---------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys, nothing_built):
    file = tmp_path / "file.txt"
    file.write_text("mine")
    err = fails_cleanly(capsys, ["pretrain", f"train.output_dir={file}", "runtime.backend=cpu"])
    assert f"train.output_dir '{file}' is a file, not a directory; pass another train.output_dir" in err
    err = fails_cleanly(capsys, ["linprobe", f"train.output_dir={file}/run", "train.init=null"])
    assert f"train.output_dir '{file}/run' lies under '{file}', which is a file" in err
    assert file.read_text() == "mine"


def test_config_that_is_a_directory_or_not_a_mapping(tmp_path, capsys):
    err = fails_cleanly(capsys, ["pretrain", "--config", str(tmp_path)])
    assert f"config file '{tmp_path}' is a directory; pass a YAML file" in err
    listed = tmp_path / "list.yaml"
    listed.write_text("- train:\n    epochs: 1\n")
    err = fails_cleanly(capsys, ["pretrain", "--config", str(listed)])
    assert f"config file '{listed}' must hold a mapping of sections (train:, optim:, ...), found a list" in err
    err = fails_cleanly(capsys, ["pretrain", "train=5"])
    assert "config section 'train' must be a mapping of keys, got 5 (int)" in err


@pytest.mark.parametrize("argv,message", [
    (["visualize", "--out", "x.png", "--count", "0"], "argument --count: must be >= 1, got 0"),
    (["visualize", "--out", "x.png", "--cell", "-4"], "argument --cell: must be >= 1, got -4"),
    (["bench", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["bench-data", "--batches", "x"], "argument --batches: expected an integer, got 'x'"),
    (["make-shards", "a", "b", "--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
    (["make-shards", "a", "b", "--quality", "101"], "argument --quality: must be >= 1 and <= 100, got 101"),
])
def test_a_bad_command_line_number_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["make-shards", "prepare-data"])
def test_an_output_under_a_file_is_exit_2(command, embedded_root, tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("mine")
    argv = {"make-shards": ["make-shards", str(embedded_root / "train"), str(file / "out")],
            "prepare-data": ["prepare-data", "--out", str(file / "out")]}[command]
    err = fails_cleanly(capsys, argv)
    assert f"'{file}/out' lies under '{file}', which is a file, not a directory; nothing was written. Pass " in err
    assert file.read_text() == "mine"


# --- damaged images ------------------------------------------------------------------------------
def image_tree(root, splits=("train",), good=0, bad=2, source=None):
    """root/<split>/c/: `good` images copied from `source` (an ImageFolder split), `bad` garbage."""
    originals = sorted(p for p in source.rglob("*") if p.suffix in (".jpg", ".png"))[:good] if good else []
    for split in splits:
        folder = root / split / "c"
        folder.mkdir(parents=True)
        for i, original in enumerate(originals):
            shutil.copy(original, folder / f"good{i}{original.suffix}")
        for i in range(bad):
            (folder / f"bad{i}.jpg").write_bytes(GARBAGE)
    return root


def test_pretraining_on_a_folder_of_unreadable_images_is_exit_2(tmp_path, capsys, nothing_built):
    root, out = image_tree(tmp_path / "data", bad=3), tmp_path / "out"
    err = fails_cleanly(capsys, ["pretrain", "--config", str(TOY_CONFIG), "data.source=imagefolder",
                                 f"data.root={root}", f"train.output_dir={out}"])
    assert (f"data.root: none of the 3 images under {root}/train can be read (e.g. {root}/train/c/bad0.jpg: "
            f"cannot identify image file)") in err
    assert "replace or remove the damaged files" in err
    assert not out.exists() or not written(out)


def test_data_root_that_is_a_file(tmp_path, capsys, nothing_built):
    file = tmp_path / "file.txt"
    file.write_text("mine")
    err = fails_cleanly(capsys, ["pretrain", "--config", str(TOY_CONFIG), "data.source=imagefolder",
                                 f"data.root={file}", f"train.output_dir={tmp_path / 'out'}"])
    assert f"data.root '{file}' is not a directory" in err


def test_evaluation_on_unreadable_images_is_exit_2(digits_root, tmp_path, capsys, nothing_built):
    root, out = image_tree(tmp_path / "data", ("train", "val"), bad=2), tmp_path / "out"
    err = fails_cleanly(capsys, ["linprobe", *tiny_eval_overrides(root, out, **{"data.source": "imagefolder"})])
    assert f"data.root: none of the 2 images under {root}/train can be read" in err
    assert not out.exists() or not written(out)


def test_an_unreadable_image_among_good_ones_is_skipped_and_named(embedded_root, tmp_path, caplog):
    """Pre-training and evaluation folders: a training sample takes the next readable image, an
    evaluation row is marked invalid; both name the file."""
    from torchvision import datasets
    from xla_trainer.data.eval import LabelledImages
    from xla_trainer.data.pretrain import build_dataset, check_readable
    root = image_tree(tmp_path / "data", good=2, bad=1, source=embedded_root / "train")
    folder = datasets.ImageFolder(root / "train")
    check_readable(folder)  # one readable image passes the startup probe
    bad = next(i for i, (path, _) in enumerate(folder.samples) if "bad" in path)
    with caplog.at_level(logging.WARNING):
        pixels, replaced = build_dataset(str(root), 32, (0.2, 1.0), seed=0)[(bad, 0)]
        assert replaced and pixels.shape == (3, 32, 32)
        blank = LabelledImages(folder, lambda image: image, blank="blank")
        assert blank[(bad, True)] == ("blank", 0, False)
        image, label, draw = LabelledImages(folder, lambda image: image.size)[(bad, 3)]
        assert draw == 3 and image is not None
    assert caplog.text.count(f"skipping unreadable image {root}/train/c/bad0.jpg") == 3


def test_visualize_skips_an_unreadable_image_and_fails_on_none(embedded_root, tmp_path, capsys, caplog):
    images = image_tree(tmp_path / "mixed", good=2, bad=1, source=embedded_root / "train")
    tiny = ["train.init=null", "backbone.size=tiny", "backbone.image_size=32", "backbone.patch_size=8",
            "backbone.width=32", "backbone.depth=2", "backbone.heads=2", "data.eval_resize=32"]
    out = tmp_path / "grid.png"
    assert main(["visualize", "--images", str(images), "--out", str(out), "--count", "3", *tiny]) == 0
    assert f"skipping unreadable image {images}/train/c/bad0.jpg" in caplog.text
    assert "2 images x" in capsys.readouterr().out and out.exists()
    broken = image_tree(tmp_path / "broken", bad=2)
    err = fails_cleanly(capsys, ["visualize", "--images", str(broken), "--out", str(tmp_path / "none.png"), *tiny])
    assert f"--images {broken}: none of its 2 image files can be read" in err
    assert not (tmp_path / "none.png").exists()


# --- damaged shards ------------------------------------------------------------------------------
@pytest.fixture
def truncated_shards(embedded_root, tmp_path):
    """Two image shards of 4 images, the second cut in half (an interrupted copy)."""
    from xla_trainer.data.shards import make_shards
    source = tmp_path / "images"
    photos = sorted(p for p in (embedded_root / "train").rglob("*") if p.suffix in (".jpg", ".png"))
    for i, path in enumerate(photos[:8]):
        (source / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, source / f"c{i % 2}" / path.name)
    shards = tmp_path / "shards"
    make_shards(str(source), str(shards), 4, max_side=32, workers=1)
    victim = shards / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return shards


def test_pretraining_from_targets_over_a_truncated_image_shard_names_it(truncated_shards, embedded_root, tmp_path,
                                                                         capsys, nothing_built):
    out = tmp_path / "out"
    args = tiny_overrides(embedded_root, out, **{"data.source": "shards", "data.shards": truncated_shards,
                                                  "targets.source": "precomputed",
                                                  "targets.prefix": tmp_path / "targets"})
    err = fails_cleanly(capsys, ["pretrain", *args])
    assert f"image shard {truncated_shards}/shard-000001.tar holds" in err
    assert "where its manifest records" in err and "it is truncated or damaged. Rebuild it: run `xla-trainer " \
        "make-shards` again" in err and "precompute it again" not in err
    assert not out.exists() or not written(out)
    err = fails_cleanly(capsys, ["precompute-targets", *args])  # nor are targets made from it
    assert f"image shard {truncated_shards}/shard-000001.tar holds" in err
    assert not (tmp_path / "targets").exists()


def test_a_stream_over_a_shard_damaged_inside_names_the_image_shard(truncated_shards, tmp_path):
    """Damage the size check cannot see (a shard of the right size, corrupt inside) surfaces
    where the stream reads it: the error names the image shard and make-shards, not the targets."""
    from xla_trainer.data.shards import ImageManifest, tar_bytes
    from xla_trainer.data.stream import ShardStream
    images = ImageManifest.load(str(truncated_shards))
    targets = tmp_path / "targets"
    targets.mkdir()
    keys = [f"{i:09d}" for i in range(4, 8)]  # the second shard's keys
    (targets / "shard-000001.tar").write_bytes(tar_bytes([(f"{k}.views.json", b"{}") for k in keys]))
    stream = ShardStream(images, str(truncated_shards), object(), str(targets), image_size=32, crop_scale=[0.2, 1],
                         seed=0, local_batch=2, steps_per_epoch=4, start_step=0, total_steps=4, process_index=0,
                         process_count=1, shuffle_buffer=2)
    with pytest.raises(RuntimeError, match=rf"image shard {truncated_shards}/shard-000001.tar ends after \d of its 4 "
                                           r"images .* rebuild it with `xla-trainer make-shards`"):
        list(stream._shard_samples("shard-000001.tar", 0, 4))
