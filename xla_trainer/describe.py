"""`describe`: the model a config builds, without data, teacher weights or a step: parameters per
top-level part (trainable and frozen) and FLOPs per image, as one JSON object or a table."""
import dataclasses
from pathlib import Path

import torch

from .config import DEFAULT_CONFIG, Config, EvalConfig, _parse_yaml, load_config
from .flops import forward_flops, objective_flops

PRETRAIN_SECTIONS = {"objective", "teacher", "targets"}


def load_any_config(path: str | None, overrides: list[str]):
    """A pre-training Config when the file has an objective, teacher or targets section (or is
    the default), else an EvalConfig (a classifier: train, finetune, probes, k-NN)."""
    text = Path(path).read_text() if path and Path(path).is_file() else ""
    sections = set(_parse_yaml(text, str(path)) or {}) if text else set()
    pretraining = not path or Path(path) == DEFAULT_CONFIG or sections & PRETRAIN_SECTIONS
    return load_config(path, overrides, schema=Config if pretraining else EvalConfig)


def count(module: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in module.parameters()) - trainable}


def parts(module: torch.nn.Module) -> dict:
    """Parameters of each top-level child (and of the module's own, as "other")."""
    found = {name: count(child) for name, child in module.named_children() if any(True for _ in child.parameters())}
    own = [p for name, p in module.named_parameters(recurse=False)]
    if own:
        trainable = sum(p.numel() for p in own if p.requires_grad)
        found["other"] = {"trainable": trainable, "frozen": sum(p.numel() for p in own) - trainable}
    return found


def describe_pretraining(cfg: Config) -> dict:
    from .pretrain import build_models, example_batch
    if cfg.teacher is not None and hasattr(cfg.teacher, "pretrained"):
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, pretrained=None))
    method, teacher, info = build_models(cfg)
    batch = example_batch(cfg, info)
    with torch.no_grad():
        forward = objective_flops(method, batch)
        teacher_fwd = forward_flops(teacher, batch["images"]) if teacher is not None else 0.0
    found = parts(method)
    if teacher is not None:
        found["teacher"] = count(teacher)
    return {"objective": cfg.objective.name, "backbone": cfg.backbone.name,
            "teacher": cfg.teacher.name if teacher is not None else None, "parameters": found,
            "flops_per_image": {"forward": forward, "train_step": 3 * forward + teacher_fwd, "teacher": teacher_fwd}}


def describe_classifier(cfg: EvalConfig, mode: str, num_classes: int) -> dict:
    from models.layers.probes import Classification
    from .evaluate import build_classifier
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=None))
    classifier = build_classifier(cfg, "finetune" if mode == "train" else mode, num_classes)
    objective = Classification(classifier).eval()  # batch statistics of one image: eval mode
    size = cfg.backbone.image_size
    batch = {"images": torch.zeros(1, 3, size, size), "targets": torch.zeros(1, num_classes)}
    with torch.no_grad():
        forward = objective_flops(objective, batch)
    if mode in ("train", "finetune"):
        head = classifier.get_classifier()
        body = count(classifier)
        head_count = count(head)
        found = {"encoder": {k: body[k] - head_count[k] for k in body}, "head": head_count}
        step = 3 * forward
    else:
        found = parts(classifier)
        step = forward + 2 * objective_flops(Classification(classifier.probe).eval(), _probe_batch(classifier, batch))
    return {"mode": mode, "backbone": cfg.backbone.name, "num_classes": num_classes, "parameters": found,
            "flops_per_image": {"forward": forward, "train_step": step, "teacher": 0.0}}


def _probe_batch(model, batch: dict) -> dict:
    from models.layers.probes import pooled_or_tokens
    with torch.no_grad():
        features = pooled_or_tokens(model.encoder, batch["images"], model.probe.takes_tokens)
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
