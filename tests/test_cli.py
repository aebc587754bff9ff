"""The command line: help, overrides, and every bad input rejected before anything compiles."""
import json
import re

import pytest

from conftest import REPO, TOY_CONFIG, run_cli, tiny_overrides
from xla_trainer.cli import main
from xla_trainer.config import CLASSIFIERS, TASKS, ConfigError, load_config


@pytest.mark.parametrize("command", ["pretrain", "train", "describe", "bench", "bench-data", "info", "prepare-data",
                                     "make-shards", "index-shards", "precompute-targets", "visualize"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: xla-trainer " + command in capsys.readouterr().out


def test_top_level_help_imports_no_torch():
    result = run_cli(["--help"], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0
    for command in ("pretrain", "train", "describe", "bench", "info", "prepare-data"):
        assert command in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "import time:" in line}
    assert "xla_trainer.cli" in imported and not {"torch", "timm", "open_clip", "xla_trainer_models"} & imported


def test_only_the_runtime_imports_torch_xla():
    """runtime.py, and xla_scan.py (runtime.scan_blocks), an XLA-only part of it that runtime.py
    alone imports, when it is asked for."""
    sources = [p for folder in ("xla_trainer", "models") for p in (REPO / folder).rglob("*.py")]
    importers = sorted(str(p.relative_to(REPO)) for p in sources
                       if re.search(r"^\s*(import|from) torch_xla", p.read_text(), re.M))
    assert importers == ["xla_trainer/runtime.py", "xla_trainer/xla_scan.py"]
    scan_importers = sorted(str(p.relative_to(REPO)) for p in sources
                            if re.search(r"^\s*from \.?(xla_trainer\.)?xla_scan import|import .*xla_scan", p.read_text(), re.M))
    assert scan_importers == ["xla_trainer/runtime.py"]


def test_overrides_and_defaults():
    cfg = load_config(None, ["train.global_batch=64", "optim.base_lr=1e-4", "objective.segments=[2, 4]",
                             "optim.clip_grad=1", "teacher.pretrained=null"])
    assert (cfg.objective.name, cfg.backbone.name, cfg.backbone.size) == ("digpt", "vit", "tiny")  # the demo
    assert cfg.train.global_batch == 64 and cfg.optim.base_lr == 1e-4
    assert cfg.objective.segments == [2, 4] and cfg.optim.clip_grad == 1.0
    assert cfg.teacher.pretrained is None


def test_paper_config_is_the_recipe():
    cfg = load_config("configs/digpt/vit_b16_in1k.yaml")
    assert (cfg.backbone.size, cfg.backbone.patch_size, cfg.backbone.image_size) == ("base", 16, 224)
    assert cfg.objective.taps == [6, 8, 10, 12] and cfg.objective.decoder_width == 1024
    assert (cfg.teacher.arch, cfg.train.epochs, cfg.train.global_batch) == ("ViT-H-14", 300, 4096)
    assert cfg.optim.base_lr == 1.5e-4 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 40
    assert cfg.data.crop_scale == [0.2, 1.0] and cfg.optim.clip_grad is None
    assert load_config("configs/digpt/vit_l16_in1k.yaml").backbone.size == "large"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads_under_its_own_task_and_passes_its_checks(path):
    from xla_trainer.evaluate import check_classifier_config
    from xla_trainer.pretrain import check_models
    task = load_config(path).task
    assert task in TASKS and f"\ntask: {task}\n" in (REPO / path).read_text()  # every shipped config names it
    cfg = load_config(path, [], task)
    if task == "pretrain":
        check_models(cfg)
    else:
        check_classifier_config(cfg)


def test_a_config_of_another_task_names_the_command_to_run(capsys):
    with pytest.raises(ConfigError, match=r"config 'configs/linprobe/demo.yaml' is a linprobe config; run "
                                          r"`xla-trainer linprobe`"):
        load_config("configs/linprobe/demo.yaml", [], "finetune")
    assert main(["pretrain", "--config", "configs/finetune/demo.yaml"]) == 2
    assert "is a finetune config; run `xla-trainer finetune`" in capsys.readouterr().err
    # eval measures what a train or finetune config trained; knn the backbone of any classifier config
    assert load_config("configs/train/demo.yaml", [], "eval").task == "eval"
    assert load_config("configs/linprobe/demo.yaml", [], "knn").task == "knn"
    with pytest.raises(ConfigError, match="is a pretrain config; run `xla-trainer pretrain`"):
        load_config("configs/digpt/demo.yaml", [], "knn")
    with pytest.raises(ConfigError, match="config key 'task' is the command's"):
        load_config("configs/digpt/demo.yaml", ["task=linprobe"])


def test_a_file_without_task_takes_the_commands(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  epochs: 3\n")
    assert load_config(plain).task == "pretrain"
    assert load_config(plain, [], "attnprobe").task == "attnprobe"
    plain.write_text("task: probe\n")
    with pytest.raises(ConfigError, match=r"task must be one of \('pretrain', 'train'"):
        load_config(plain)


@pytest.mark.parametrize("task,override,owner", [
    ("linprobe", "teacher.arch=ViT-B-16", "`xla-trainer pretrain`"),
    ("linprobe", "objective.segments=[2,2]", "`xla-trainer pretrain`"),
    ("finetune", "train.accum_steps=2", "`xla-trainer pretrain`"),
    ("knn", "data.crop_ratio=[1,1]", "`xla-trainer pretrain`"),
    ("pretrain", "augment.mixup=0", "the classifier tasks"),
    ("pretrain", "probe.k=5", "the classifier tasks"),
    ("pretrain", "train.init=run", "the classifier tasks"),
    ("pretrain", "optim.layer_decay=0.7", "the classifier tasks"),
])
def test_a_key_of_another_task_is_refused(task, override, owner):
    path = "configs/digpt/demo.yaml" if task == "pretrain" else f"configs/{task}/demo.yaml"
    key = override.split("=")[0]
    section = key.split(".")[0] if key.split(".")[0] in ("teacher", "objective", "augment", "probe") else key
    owner = owner.replace("tasks", f"tasks ({', '.join(CLASSIFIERS)})")
    with pytest.raises(ConfigError, match=re.escape(f"config key '{section}' is read only by {owner}; a {task} "
                                                    f"config cannot set it")):
        load_config(path, [override], task)


def test_a_pretraining_section_in_a_linprobe_file_is_refused(tmp_path):
    misplaced = tmp_path / "probe.yaml"
    misplaced.write_text("task: linprobe\ntargets:\n  source: online\n")
    with pytest.raises(ConfigError, match="config key 'targets' is read only by `xla-trainer pretrain`; a linprobe"):
        load_config(misplaced, [], "linprobe")


def test_each_task_starts_from_todays_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    pretrain = load_config(empty, [], "pretrain")
    assert pretrain.data.crop_scale == [0.2, 1.0] and pretrain.data.num_workers == 4
    assert (pretrain.optim.base_lr, pretrain.optim.betas, pretrain.optim.warmup_epochs, pretrain.optim.min_lr) == \
        (1.5e-4, [0.9, 0.95], 40.0, 0.0)
    assert (pretrain.train.epochs, pretrain.train.global_batch, pretrain.train.output_dir,
            pretrain.train.keep_checkpoints) == (300, 4096, "runs/digpt", 2)
    for task in CLASSIFIERS:
        cfg = load_config(empty, [], task)
        assert cfg.data.crop_scale == [0.08, 1.0] and cfg.data.num_workers == 8
        assert (cfg.optim.base_lr, cfg.optim.betas, cfg.optim.warmup_epochs, cfg.optim.min_lr) == \
            (1e-4, [0.9, 0.999], 5.0, 1e-6)
        assert (cfg.train.epochs, cfg.train.global_batch, cfg.train.output_dir, cfg.train.keep_checkpoints) == \
            (100, 1024, "runs/finetune", 1)
    # the file and the overrides still win over the task's defaults
    assert load_config("configs/linprobe/demo.yaml", ["data.num_workers=3"]).data.num_workers == 3


def test_a_run_records_the_keys_of_its_task_alone():
    pretrain = load_config("configs/digpt/demo.yaml").to_dict()
    probe = load_config("configs/linprobe/demo.yaml").to_dict()
    assert {"objective", "teacher", "targets"} <= set(pretrain) and not {"augment", "probe"} & set(pretrain)
    assert {"augment", "probe"} <= set(probe) and not {"objective", "teacher", "targets"} & set(probe)
    assert "crop_ratio" in pretrain["data"] and "eval_resize" not in pretrain["data"]
    assert "init" in probe["train"] and "accum_steps" not in probe["train"]


@pytest.mark.parametrize("override,message", [
    ("train.globl_batch=8", "unknown config key 'train.globl_batch'; did you mean 'train.global_batch'?"),
    ("optimizer.lr=1", "unknown config key 'optimizer.lr'"),
    ("train.global_batch=abc", "config key 'train.global_batch' must be int, got 'abc'"),
    ("objective.shared_tap_norm=3", "config key 'objective.shared_tap_norm' must be bool"),
    ("backbone.size=giant", "config key 'backbone.size' must be one of ('tiny', 'small', 'base', 'large', 'huge')"),
    ("objective.decoder_widht=8", "unknown config key 'objective.decoder_widht'; did you mean 'objective.decoder_width'?"),
    ("objective.name=nope", "config key 'objective.name': unknown objective 'nope'; registered: digpt, saim, toy, xtra"),
    ("backbone.name=nope", "unknown backbone 'nope'; registered: adventurer, crate_alpha, toy, vit"),
    ("model.segments=[2,2]", "unknown config key 'model.segments'; did you mean 'objective.segments'?"),
    ("runtime.backend=tpu", "config key 'runtime.backend' must be one of"),
    ("train.epochs", "must look like key.sub=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_config_file(capsys):
    assert main(["pretrain", "--config", "nope.yaml"]) == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err


def test_plugin_sections_take_the_chosen_entrys_keys():
    cfg = load_config(TOY_CONFIG, ["objective.keep=0.25"])
    assert (cfg.objective.name, cfg.objective.keep) == ("toy", 0.25)
    with pytest.raises(ConfigError, match="unknown config key 'objective.segments'; did you mean 'objective.name'"):
        load_config(TOY_CONFIG, ["objective.segments=[2,2]"])  # a D-iGPT key on the toy objective
    # choosing another entry starts from its defaults
    assert load_config(TOY_CONFIG, ["backbone.name=toy"]).backbone.width == 32
    with pytest.raises(ConfigError, match="config key 'teacher.arch' is set, but objective 'toy' has no teacher"):
        load_config(TOY_CONFIG, ["teacher.arch=ViT-B-16"])
    with pytest.raises(ConfigError, match="config key 'teacher.arch' is set, but objective 'toy' has no teacher"):
        load_config(None, ["objective.name=toy"])  # the demo config's teacher section


@pytest.mark.parametrize("extra,message", [
    ({"data.source": "imagefolder", "data.root": "/no/such/dir"}, "data.root '/no/such/dir' does not exist"),
    ({"backbone.image_size": 40}, "a 5x5 token grid does not split into 2x2 equal segments"),
    ({"backbone.image_size": 36}, "backbone.image_size 36 is not a multiple of backbone.patch_size 8"),
    ({"train.accum_steps": 3}, "train.global_batch 8 is not divisible by data-parallel size 1 x train.accum_steps 3"),
    ({"backbone.image_size": 48, "backbone.patch_size": 12}, "teacher grid: a 6x6 token grid does not split into 4x4"),
    ({"objective.taps": "[1, 3]"}, "objective.taps (1, 3) must lie in 1..2 (the encoder's depth)"),
])
def test_bad_input_fails_before_training(embedded_root, tmp_path, capsys, extra, message):
    if extra.get("backbone.patch_size") == 12:
        extra["objective.segments"] = "[4, 4]"  # student 4x4 grid splits; teacher 48/8 = 6 does not
    assert main(["pretrain", *tiny_overrides(embedded_root, tmp_path / "out", **extra)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_info_reports_backend_and_versions():
    result = run_cli(["info", "--backend", "cpu"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["backend"] == "cpu" and info["process_count"] == 1 and info["process_index"] == 0
    assert info["versions"]["torch"]


@pytest.mark.slow  # a subprocess or a whole training: not in the edit loop
@pytest.mark.xla
def test_info_xla_mesh():
    result = run_cli(["info", "--backend", "xla"], env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["num_devices"] == 4 and info["mesh"] == {"shape": [4, 1], "axes": ["data", "fsdp"]}


@pytest.mark.slow  # a subprocess or a whole training: not in the edit loop
@pytest.mark.xla
def test_bench_reports_one_graph_execution_per_step(tmp_path):
    """`xla-trainer bench` on XLA:CPU, a tiny 4-block D-iGPT with precomputed targets whose student
    segments (1x1 patches) are resized to the teacher's (2x2), as ViT-B/16's 7x7 are to ViT-H/14's
    8x8, its step traced at every call (the loop over the blocks, or runtime.scan_blocks) or
    replayed (runtime.dynamo_step): one graph per step, nothing run on the host, the compile count
    flat, the same graph every step; the scan traces fewer IR nodes than the loop, the replay none."""
    reports = {}
    for variant, extra in (("loop", {}), ("scan", {"runtime.scan_blocks": "true"}),
                           ("dynamo", {"runtime.dynamo_step": "true"})):
        overrides = tiny_overrides(tmp_path, tmp_path / "out", **{
            "backbone.patch_size": 16, "backbone.depth": 4, "runtime.backend": "xla",
            "targets.source": "precomputed", "teacher.pretrained": "null", **extra})
        result = run_cli(["bench", "--config", "configs/digpt/demo.yaml", "--steps", "2", "--warmup", "2",
                          "--profile-host", *overrides], env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        reports[variant] = report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["executions_per_step"] == 1 and report["host_fallbacks_per_step"] == 0, variant
        assert report["compiles"] == report["compiles_after_warmup"] and report["step_compiles"] >= 1, variant
        assert report["same_graph_every_step"], variant
        assert report["host_ms_per_step"] > 0 and report["device_ms_per_step"] > 0
        assert report["host_cpu_ms_per_step"] > 0 and set(report["host_vs_tpu_step"]) == {"v4", "v5p", "v6e"}
        assert report["images_per_sec"] > 0 and report["mfu"] is None  # no known peak for a CPU
        assert "graph executions" in result.stdout and "images/s" in result.stdout
    loop, scan, dynamo = reports["loop"], reports["scan"], reports["dynamo"]
    assert loop["graphs_traced_per_step"] == scan["graphs_traced_per_step"] == 1
    assert 0 < scan["ir_nodes_per_step"] < loop["ir_nodes_per_step"] and loop["ir_nodes_per_step"] > 1000
    assert 0 < loop["trace_ms_per_step"] < loop["host_ms_per_step"]
    assert any("_xla_step_marker" in function for function, _ in loop["host_profile"])  # the dispatch
    assert dynamo["graphs_traced_per_step"] == 0 and dynamo["ir_nodes_per_step"] == 0
    assert any("_run_cached_graph" in function for function, _ in dynamo["host_profile"])  # the replay


@pytest.mark.parametrize("name", ["configs/digpt/vit_b16_in1k.yaml", "digpt/vit_b16_in1k.yaml"])
def test_a_shipped_config_is_found_by_its_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(name).backbone.size == "base"
    (tmp_path / "digpt").mkdir()  # a file of the user's own by that name wins
    (tmp_path / "digpt" / "vit_b16_in1k.yaml").write_text("backbone: {size: large}\n")
    assert load_config("digpt/vit_b16_in1k.yaml").backbone.size == "large"
