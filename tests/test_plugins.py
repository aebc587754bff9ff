"""A system added from outside the packages: the toy backbone of toy_plugins.py pre-trains, fine-tunes,
probes, runs k-NN and exports through the real commands with no edit outside its own file; and
`describe` counts what a config builds."""
import json

import pytest
import safetensors.torch
import torch

from conftest import TOY_CONFIG, read_metrics, tiny_eval_overrides
from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
from xla_trainer.checkpoint import newest_checkpoint, read_checkpoint
from xla_trainer.cli import main
from xla_trainer.config import load_config
from xla_trainer.flops import objective_flops
from xla_trainer.pretrain import build_models, example_batch

TOY = {"backbone.name": "toy", "backbone.image_size": 32, "backbone.patch_size": 8, "backbone.width": 32,
       "backbone.depth": 2}


def eval_args(digits_root, out, **extra):
    """The tiny evaluation overrides with the toy backbone in place of the ViT."""
    values = dict(a.split("=", 1) for a in tiny_eval_overrides(digits_root, out, **extra))
    values = {k: v for k, v in values.items() if not k.startswith("backbone.")}
    return [f"{k}={v}" for k, v in {**values, **TOY}.items()]


@pytest.mark.slow  # a subprocess or a whole training: not in the edit loop
def test_toy_backbone_pretrains_finetunes_probes_and_exports(embedded_root, digits_root, tmp_path, capsys):
    run = tmp_path / "pretrain"
    assert main(["pretrain", "--config", str(TOY_CONFIG), f"data.root={embedded_root}", f"train.output_dir={run}",
                 "train.stop_at_step=4", *[f"{k}={v}" for k, v in TOY.items()]]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    common = {"runtime.backend": "cpu", "train.epochs": 1}
    for mode in ("finetune", "linprobe", "attnprobe", "knn"):
        args = eval_args(digits_root, tmp_path / mode, **common, **{"train.init": run})
        assert main([mode, *args]) == 0, mode
        line = capsys.readouterr().out
        top1 = float(line.split("top-1 ")[1].split("%")[0])
        assert 0 <= top1 <= 100 and f"{mode}: top-1" in line
    # the probes left the pre-trained weights alone: their best checkpoint holds them unchanged
    out = tmp_path / "toy.safetensors"
    assert main(["export-timm", "--backbone", "toy", str(run), str(out)]) == 0
    exported = safetensors.torch.load_file(str(out))
    saved = read_checkpoint(str(run / "checkpoints" / "4"), ("model",))["model"]
    assert sorted(exported) == sorted(k[len("encoder."):] for k in saved if k.startswith("encoder."))
    assert all(torch.equal(exported[k], saved[f"encoder.{k}"]) for k in exported)
    probe = read_checkpoint(newest_checkpoint(str(tmp_path / "linprobe" / "best")), ("model",))["model"]
    assert all(torch.equal(probe[f"encoder.{k}"], v) for k, v in exported.items())


def describe(capsys, *args) -> dict:
    assert main(["describe", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_describe_counts_the_demo_digpt(capsys):
    result = describe(capsys)  # the default config: the D-iGPT demo
    cfg = load_config(None, [])
    student = SegmentViT(ViTConfig(size="tiny", image_size=64, patch_size=8, width=128, depth=4, heads=4))
    parts = result["parameters"]
    assert parts["encoder"] == {"trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
                                "frozen": student.pos_embed.numel()}
    assert parts["teacher"]["trainable"] == 0 and parts["teacher"]["frozen"] > 0
    assert set(parts) == {"encoder", "decoders", "teacher"}
    method, teacher, info = build_models(cfg)
    assert parts["decoders"]["trainable"] == sum(p.numel() for p in method.decoders.parameters())
    flops = result["flops_per_image"]
    assert flops["forward"] == pytest.approx(objective_flops(method, example_batch(cfg, info)))
    assert flops["train_step"] == pytest.approx(3 * flops["forward"] + flops["teacher"]) and flops["teacher"] > 0


def test_describe_a_classifier_and_the_table(capsys):
    result = describe(capsys, "--config", "configs/finetune/demo.yaml", "--num-classes", "10")
    head = result["parameters"]["head"]
    assert head == {"trainable": 128 * 10 + 10, "frozen": 0} and result["num_classes"] == 10
    probe = describe(capsys, "--config", "configs/linprobe/demo.yaml", "--num-classes", "10")  # its task: linprobe
    assert probe["parameters"]["encoder"]["trainable"] == 0 and probe["parameters"]["probe"]["trainable"] == 1290
    assert probe["flops_per_image"]["train_step"] < 1.01 * probe["flops_per_image"]["forward"]
    assert (result["mode"], probe["mode"]) == ("finetune", "linprobe")  # each file's own task
    knn = describe(capsys, "--config", "configs/knn/demo.yaml", "--num-classes", "10")  # the classifier it reads
    assert knn["mode"] == "knn" and knn["parameters"]["head"] == head
    assert main(["describe", "--config", str(TOY_CONFIG), "--table"]) == 0
    table = capsys.readouterr().out
    assert "encoder" in table and "head" in table and "GFLOPs/image forward" in table and "teacher" not in table.split("GFLOPs")[0]
