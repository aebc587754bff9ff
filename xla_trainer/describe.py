"""`describe`: the model a config builds, without data, teacher weights or a step: parameters per
top-level part (trainable and frozen) and FLOPs per image, as one JSON object or a table."""
import dataclasses
from pathlib import Path

import torch

from .config import DEFAULT_CONFIG, Config, EvalConfig, load_config, read_sections
from .flops import objective_flops, step_flops, train_flops_per_image

PRETRAIN_SECTIONS = {"objective", "teacher", "targets"}


def load_any_config(path: str | None, overrides: list[str]):
    """A pre-training Config when the file has an objective, teacher or targets section (or is
    the default), else an EvalConfig (a classifier: train, finetune, probes, k-NN)."""
    sections = set(read_sections(path)) if path else set()
    pretraining = not path or Path(path) == DEFAULT_CONFIG or sections & PRETRAIN_SECTIONS
    return load_config(path, overrides, schema=Config if pretraining else EvalConfig)


def count(params) -> dict:
    params = list(params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}


def parts(module: torch.nn.Module) -> dict:
    """Parameters of each top-level child (and of the module's own, as "other")."""
    found = {name: count(child.parameters()) for name, child in module.named_children()
             if any(True for _ in child.parameters())}
    own = list(module.parameters(recurse=False))
    if own:
        found["other"] = count(own)
    return found


def describe_pretraining(cfg: Config) -> dict:
    from .pretrain import build_models, example_batch
    if cfg.teacher is not None and hasattr(cfg.teacher, "pretrained"):
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, pretrained=None))
    method, teacher, info = build_models(cfg)
    flops = train_flops_per_image(method, teacher, example_batch(cfg, info))
    found = parts(method)
    if teacher is not None:
        found["teacher"] = count(teacher.parameters())
    return {"objective": cfg.objective.name, "backbone": cfg.backbone.name,
            "teacher": cfg.teacher.name if teacher is not None else None, "parameters": found,
            "flops_per_image": {"forward": flops["student_forward"], "train_step": flops["train_step"],
                                "teacher": flops["teacher_forward"]}}


def describe_classifier(cfg: EvalConfig, mode: str, num_classes: int) -> dict:
    from xla_trainer_models.layers.probes import Classification
    from .evaluate import build_classifier, example_batch
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=None))
    classifier = build_classifier(cfg, "finetune" if mode == "train" else mode, num_classes)
    objective = Classification(classifier).eval()  # batch statistics of one image: eval mode
    batch = example_batch(cfg, num_classes)
    with torch.no_grad():
        forward = objective_flops(objective, batch)
    if mode in ("train", "finetune"):
        head = classifier.get_classifier()
        body = count(classifier.parameters())
        head_count = count(head.parameters())
        found = {"encoder": {k: body[k] - head_count[k] for k in body}, "head": head_count}
        step = step_flops(forward)["train_step"]
    else:
        found = parts(classifier)
        step = forward + 2 * objective_flops(Classification(classifier.probe).eval(), _probe_batch(classifier, batch))
    return {"mode": mode, "backbone": cfg.backbone.name, "num_classes": num_classes, "parameters": found,
            "flops_per_image": {"forward": forward, "train_step": step, "teacher": 0.0}}


def _probe_batch(model, batch: dict) -> dict:
    from xla_trainer_models.layers.probes import probe_features
    with torch.no_grad():
        features = probe_features(model.encoder, batch["images"], model.probe.takes_tokens, model.blocks)
    return {"images": features, "targets": batch["targets"]}


def describe(cfg, mode: str = "finetune", num_classes: int = 1000) -> dict:
    result = describe_pretraining(cfg) if isinstance(cfg, Config) else describe_classifier(cfg, mode, num_classes)
    total = {k: sum(p[k] for p in result["parameters"].values()) for k in ("trainable", "frozen")}
    return {**result, "parameters_total": total}


def table(result: dict) -> str:
    rows = [f"{'part':<14}{'trainable':>14}{'frozen':>14}"]
    for name, p in {**result["parameters"], "total": result["parameters_total"]}.items():
        rows.append(f"{name:<14}{p['trainable']:>14,}{p['frozen']:>14,}")
    rows.append("")
    rows += [f"{'GFLOPs/image ' + k:<28}{v / 1e9:>14.3f}" for k, v in result["flops_per_image"].items()]
    return "\n".join(rows)
