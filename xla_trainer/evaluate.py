"""Classifiers on any backbone: supervised training from scratch (`train`), fine-tuning, linear
and attentive probing, k-NN.

Reading order: `train_classifier` (builds the classifier and runs the shared loop of loop.py,
evaluating every train.eval_every epochs) -> `eval_step` (top-1/top-5 counts of one padded val
batch, summed on the device); `knn` (frozen features, cosine k-NN). Device specifics stay in
runtime.py."""
import logging
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import BACKBONES
from models.layers.probes import AttentiveProbe, Classification, FrozenEncoderProbe, LinearProbe, probe_features
from .checkpoint import check_checkpoint_format
from .config import ConfigError, EvalConfig
from .data.eval import EvalData, open_eval_data
from .flops import peak_flops, train_flops_per_image
from .loop import Cadence, StepSettings, Task, make_schedule, resume, run
from .metrics import MetricsLogger
from .optim import build_eval_optimizer
from .pretrained import load_backbone_state
from .pretrain import make_runtime
from .runtime import Runtime

log = logging.getLogger(__name__)


# --- models -------------------------------------------------------------------------------------
def backbone_entry(cfg: EvalConfig):
    try:
        backbone = BACKBONES.get(cfg.backbone.name)
        backbone.check(cfg.backbone)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return backbone


def build_encoder(cfg: EvalConfig, num_classes: int = 0):
    """The backbone's classifier, its weights from train.init (random when null)."""
    backbone = backbone_entry(cfg)
    torch.manual_seed(cfg.train.seed)
    encoder = backbone.classifier(cfg.backbone, num_classes)
    init = cfg.train.init
    if init:
        try:
            state = load_backbone_state(init, backbone)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"train.init: {e} (the demo configs read `make demo`'s runs/demo; "
                              f"train.init=null starts from random init)") from None
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a new task's head
        missing, unexpected = encoder.load_state_dict(backbone.adapt_state(state, encoder), strict=False)
        missing = [k for k in missing if not k.startswith("head.")]  # the new head starts fresh
        if missing or unexpected:
            raise ConfigError(f"train.init '{init}' does not fit backbone.* ({cfg.backbone}): missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
        log.info("encoder weights from %s", init)
    return encoder


def build_classifier(cfg: EvalConfig, mode: str, num_classes: int) -> torch.nn.Module:
    if mode in ("train", "finetune"):
        return build_encoder(cfg, num_classes)
    encoder = build_encoder(cfg)
    check_probe_blocks(cfg, encoder)
    dim = encoder.num_features
    probe = LinearProbe(dim, num_classes) if mode == "linprobe" else AttentiveProbe(dim, num_classes, cfg.probe.heads)
    return FrozenEncoderProbe(encoder, probe, cfg.probe.blocks)


def check_probe_blocks(cfg: EvalConfig, encoder):
    blocks = cfg.probe.blocks
    if blocks is None:
        return
    depth = len(getattr(encoder, "blocks", ()))
    if not hasattr(encoder, "forward_intermediates") or not 1 <= blocks <= depth:
        raise ConfigError(f"probe.blocks {blocks}: the mean of the last blocks' outputs needs 1 <= probe.blocks <= "
                          f"{depth} (the depth) and a classifier with forward_intermediates "
                          f"(backbone {cfg.backbone.name!r}); null takes its final features")


def example_batch(cfg: EvalConfig, num_classes: int) -> dict:
    """One image's batch, as the step sees it (soft targets), for FLOP counting."""
    size = cfg.backbone.image_size
    return {"images": torch.zeros(1, 3, size, size), "targets": torch.zeros(1, num_classes)}


# --- the steps ----------------------------------------------------------------------------------
def topk_counts(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> dict:
    """Correct top-1 / top-5 predictions among the valid rows (padding rows count nothing)."""
    hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
    return {"top1": (hits[:, 0] & valid).sum().float(), "top5": (hits.any(1) & valid).sum().float(),
            "count": valid.sum().float()}


def eval_step(model, batch, totals, *, runtime: Runtime):
    """`totals` plus this batch's counts and summed cross-entropy, all on the device."""
    with runtime.autocast():
        logits = model(batch["images"]).float()
    counts = topk_counts(logits, batch["labels"], batch["valid"])
    counts["loss"] = (F.cross_entropy(logits, batch["labels"], reduction="none") * batch["valid"]).sum()
    return {k: totals[k] + v for k, v in counts.items()}


def accuracy(runtime: Runtime, totals: dict) -> dict:
    """Percentages from summed counts (one host read, summed over the processes)."""
    keys = list(totals)
    sums = dict(zip(keys, runtime.sum_over_processes([float(totals[k]) for k in keys])))
    n = sums.pop("count")
    result = {k: 100 * v / n for k, v in sums.items() if k != "loss"}
    if "loss" in sums:
        result["loss"] = sums["loss"] / n
    return {**result, "images": int(n)}


def evaluate(model, eval_fn, runtime: Runtime, data: EvalData) -> dict:
    model.eval()
    totals = {k: torch.zeros((), device=runtime.device) for k in ("top1", "top5", "count", "loss")}
    with torch.no_grad():
        for batch in runtime.device_batches(data.val()):
            totals = eval_fn(model, batch, totals, runtime=runtime)
    model.train()
    return accuracy(runtime, totals)


# --- fine-tuning and probes ---------------------------------------------------------------------
def check_eval_config(cfg: EvalConfig, mode: str = "knn"):
    t = cfg.train
    if t.epochs < 1 or t.log_every < 1 or t.eval_every < 1:
        raise ConfigError("train.epochs, train.log_every and train.eval_every must be >= 1")
    if mode == "train" and t.init:
        raise ConfigError(f"`train` trains a classifier from scratch, but train.init is '{t.init}'; "
                          f"use `finetune` to start from those weights, or pass train.init=null")
    backbone_entry(cfg)


def train_classifier(cfg: EvalConfig, mode: str) -> dict:
    """train (a classifier from scratch), finetune (every weight, from train.init), linprobe or
    attnprobe (a probe on the frozen encoder): train on data train/, evaluate on val/ every
    train.eval_every epochs; keep the last and the best checkpoints; resume from the last one in
    train.output_dir."""
    check_eval_config(cfg, mode)
    runtime = make_runtime(cfg)
    out = cfg.train.output_dir.rstrip("/")
    for run_dir in (out, f"{out}/best"):
        check_checkpoint_format(run_dir, runtime.backend)
    data = open_eval_data(cfg, runtime)
    schedule = make_schedule(cfg, data.train_len)
    classifier = build_classifier(cfg, mode, data.num_classes)
    objective = Classification(classifier)
    flops = None
    if peak_flops(runtime.device_kind()):
        flops = train_flops_per_image(objective, None, example_batch(cfg, data.num_classes))
    wrapped = runtime.wrap_model(objective, BACKBONES.get(cfg.backbone.name).blocks)
    o, t = cfg.optim, cfg.train
    optimizer = build_eval_optimizer(
        classifier, o.name, schedule.peak_lr, o.weight_decay, o.layer_decay if mode == "finetune" else 1.0,
        o.betas, o.momentum, **(runtime.optimizer_options() if o.name == "adamw" else {}))
    runtime.init_optimizer_state(optimizer)
    task = Task(mode, classifier, wrapped, optimizer, schedule,
                StepSettings(1, o.clip_grad, t.global_batch, t.seed), flops=flops)

    last, best = runtime.checkpoints(out, t.keep_checkpoints), runtime.checkpoints(f"{out}/best", 1)
    state = {"step": 0, "best_top1": -1.0, "best_epoch": 0, "config": cfg.to_dict()}
    start, extra = resume(last, task, dict(state))
    state = extra or state
    total = schedule.total_steps
    logger = MetricsLogger(out, runtime.is_main, start)
    eval_fn = runtime.compile_fn(eval_step, "eval_step")
    result = {}

    def evaluate_at_epoch_end(done: int):
        nonlocal result
        epoch, rest = divmod(done, schedule.steps_per_epoch)
        if rest or (epoch % t.eval_every and done != total):
            return
        result = evaluate(classifier, eval_fn, runtime, data)
        if result["top1"] > state["best_top1"]:
            state.update(best_top1=result["top1"], best_epoch=epoch)
            best.save(done, classifier, optimizer, dict(state, step=done))
        logger.log({"step": done, "epoch": epoch, **{f"val_{k}": v for k, v in result.items()},
                    "best_top1": state["best_top1"]}, group="val")

    run(task, runtime, runtime.device_batches(data.train(start, total)), last, logger, start=start, end=total,
        cadence=Cadence(t.log_every, schedule.steps_per_epoch, log_at_epoch_end=True),
        extra_state=lambda done: dict(state, step=done), after_step=evaluate_at_epoch_end, output_dir=out)
    for store in (last, best):
        store.close()
    logger.close()
    best_step = best.latest()
    return {"mode": mode, **{f"val_{k}": v for k, v in result.items()},
            "best_top1": state["best_top1"], "best_epoch": state["best_epoch"],
            "best_checkpoint": best.location(best_step) if best_step else None,
            "metrics": str(logger.path), "compiles": runtime.compiles()}


# --- k-NN ---------------------------------------------------------------------------------------
def features_step(encoder, images, *, runtime: Runtime, blocks: int | None):
    """L2-normalised pooled features of a batch (probe.blocks: see probe_features)."""
    with runtime.autocast():
        pooled = probe_features(encoder, images, tokens=False, blocks=blocks)
    return F.normalize(pooled.float(), dim=-1)


def neighbours_step(queries, keys, key_labels, key_valid, best_sims, best_labels, *, k: int):
    """Merge one chunk of the bank into each query's running top-k by cosine similarity."""
    sims = (queries @ keys.T).masked_fill(~key_valid[None], float("-inf"))
    sims = torch.cat([best_sims, sims], dim=1)
    labels = torch.cat([best_labels, key_labels[None].expand(queries.shape[0], -1)], dim=1)
    best_sims, index = sims.topk(k, dim=1)
    return best_sims, torch.gather(labels, 1, index)


def vote_step(best_sims, best_labels, labels, valid, totals, *, num_classes: int, temperature: float):
    """Votes weighted exp(cos / T) per class; top-1/top-5 counts added to `totals`."""
    votes = torch.zeros(best_sims.shape[0], num_classes, device=best_sims.device)
    votes = votes.scatter_add(1, best_labels, torch.exp(best_sims / temperature))
    counts = topk_counts(votes, labels, valid)
    return {key: totals[key] + v for key, v in counts.items()}


def knn(cfg: EvalConfig) -> dict:
    """Cosine k-NN on frozen pooled features (probe.k neighbours, votes weighted by
    exp(cos / probe.temperature)): the bank is the train split under the eval transform."""
    check_eval_config(cfg)
    runtime = make_runtime(cfg)
    data = open_eval_data(cfg, runtime)
    if cfg.probe.k > data.train_len:
        raise ConfigError(f"probe.k {cfg.probe.k} exceeds the {data.train_len} training images")
    # inference only: replicated on every device, no DDP wrapper
    encoder = build_encoder(cfg)
    check_probe_blocks(cfg, encoder)
    encoder = encoder.to(runtime.device).eval().requires_grad_(False)
    features = runtime.compile_fn(features_step, "knn_features")
    neighbours = runtime.compile_fn(neighbours_step, "knn_neighbours")
    vote = runtime.compile_fn(vote_step, "knn_vote")

    with torch.no_grad():
        bank = []  # (features, labels, valid) per padded train batch, every process's rows
        for batch in tqdm(runtime.device_batches(data.train_in_order()), desc="knn features",
                          disable=not runtime.is_main, dynamic_ncols=True):
            pooled = features(encoder, batch["images"], runtime=runtime, blocks=cfg.probe.blocks)
            rows = (pooled, batch["labels"], batch["valid"])
            bank.append(tuple(runtime.gather_rows(t) for t in rows))
        totals = {key: torch.zeros((), device=runtime.device) for key in ("top1", "top5", "count")}
        k = cfg.probe.k
        for batch in runtime.device_batches(data.val()):
            queries = features(encoder, batch["images"], runtime=runtime, blocks=cfg.probe.blocks)
            best_sims = torch.full((queries.shape[0], k), float("-inf"), device=queries.device)
            best_labels = torch.zeros((queries.shape[0], k), dtype=torch.long, device=queries.device)
            for keys, key_labels, key_valid in bank:
                best_sims, best_labels = neighbours(queries, keys, key_labels, key_valid, best_sims,
                                                    best_labels, k=k)
            totals = vote(best_sims, best_labels, batch["labels"], batch["valid"], totals,
                          num_classes=data.num_classes, temperature=cfg.probe.temperature)
    result = accuracy(runtime, totals)
    logger = MetricsLogger(cfg.train.output_dir, runtime.is_main)
    logger.log({"step": 0, **{f"val_{key}": v for key, v in result.items()}, "k": k,
                "temperature": cfg.probe.temperature, "train_images": data.train_len}, group="knn")
    logger.close()
    return {"mode": "knn", **{f"val_{key}": v for key, v in result.items()},
            "metrics": str(logger.path), "compiles": runtime.compiles(), "runtime": asdict(runtime.info())}
