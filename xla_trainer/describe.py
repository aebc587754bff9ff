"""`describe`: the model a config's task builds, without data, teacher weights or a step:
parameters per top-level part (trainable and frozen) and FLOPs per image, as one JSON object or a
table
(`--no-flops`: parameters alone, built on the meta device)."""
import contextlib
import dataclasses

import torch

from .config import Config
from .flops import objective_flops, step_flops, train_flops_per_image

# The classifier each task trains, as build_classifier names it: `eval` and `knn` train nothing;
# they are shown with the whole classifier they read, as `finetune` builds it.
NETWORKS = {"train": "finetune", "finetune": "finetune", "linprobe": "linprobe", "attnprobe": "attnprobe",
            "eval": "finetune", "knn": "finetune"}


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


def describe_pretraining(cfg: Config, with_flops: bool) -> dict:
    from .pretrain import build_models, example_batch
    if cfg.teacher is not None and hasattr(cfg.teacher, "pretrained"):
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, pretrained=None))
    method, teacher, info = build_models(cfg)
    found = parts(method)
    if teacher is not None:
        found["teacher"] = count(teacher.parameters())
    result = {"objective": cfg.objective.name, "backbone": cfg.backbone.name,
              "teacher": cfg.teacher.name if teacher is not None else None, "parameters": found}
    if with_flops:
        flops = train_flops_per_image(method, teacher, example_batch(cfg, info))
        result["flops_per_image"] = {"forward": flops["student_forward"], "train_step": flops["train_step"],
                                     "teacher": flops["teacher_forward"]}
    return result


def describe_classifier(cfg: Config, num_classes: int, with_flops: bool) -> dict:
    from .evaluate import build_classifier
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=None))
    network = NETWORKS[cfg.task]
    classifier = build_classifier(cfg, network, num_classes)
    if network == "finetune":
        body, head = count(classifier.parameters()), count(classifier.get_classifier().parameters())
        found = {"encoder": {k: body[k] - head[k] for k in body}, "head": head}
    else:
        found = parts(classifier)
    result = {"mode": cfg.task, "backbone": cfg.backbone.name, "num_classes": num_classes, "parameters": found}
    if with_flops:
        result["flops_per_image"] = classifier_flops(cfg, classifier, network, num_classes)
    return result


def classifier_flops(cfg: Config, classifier, network: str, num_classes: int) -> dict:
    from xla_trainer_models.layers.probes import Classification
    from .evaluate import example_batch
    objective = Classification(classifier).eval()  # batch statistics of one image: eval mode
    batch = example_batch(cfg, num_classes)
    with torch.no_grad():
        forward = objective_flops(objective, batch)
    if network == "finetune":
        step = step_flops(forward)["train_step"]
    else:
        step = forward + 2 * objective_flops(Classification(classifier.probe).eval(), _probe_batch(classifier, batch))
    return {"forward": forward, "train_step": step, "teacher": 0.0}


def _probe_batch(model, batch: dict) -> dict:
    from xla_trainer_models.layers.probes import probe_features
    with torch.no_grad():
        features = probe_features(model.encoder, batch["images"], model.probe.takes_tokens, model.blocks)
    return {"images": features, "targets": batch["targets"]}


def describe(cfg: Config, num_classes: int = 1000, with_flops: bool = True) -> dict:
    """`num_classes`: the outputs of a classifier's head (a pre-training config has none).
    with_flops=False: parameters only, the model built on the meta device (no memory, no init:
    instant at any size)."""
    with contextlib.nullcontext() if with_flops else torch.device("meta"):
        result = (describe_pretraining(cfg, with_flops) if cfg.task == "pretrain"
                  else describe_classifier(cfg, num_classes, with_flops))
    total = {k: sum(p[k] for p in result["parameters"].values()) for k in ("trainable", "frozen")}
    return {**result, "parameters_total": total}


def table(result: dict) -> str:
    rows = [f"{'part':<14}{'trainable':>14}{'frozen':>14}"]
    for name, p in {**result["parameters"], "total": result["parameters_total"]}.items():
        rows.append(f"{name:<14}{p['trainable']:>14,}{p['frozen']:>14,}")
    rows.append("")
    rows += [f"{'GFLOPs/image ' + k:<28}{v / 1e9:>14.3f}" for k, v in result.get("flops_per_image", {}).items()]
    return "\n".join(rows)
