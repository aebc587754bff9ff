"""Classifiers on any backbone: supervised training from scratch (`train`), fine-tuning, linear
and attentive probing, k-NN.

Reading order: `train_classifier` (builds the classifier and runs the shared loop of loop.py,
evaluating every train.eval_every epochs) -> `eval_step` (top-1/top-5 counts of one padded val
batch, summed on the device); `knn` (frozen features, cosine k-NN). Device specifics stay in
runtime.py."""
import contextlib
import logging
from dataclasses import asdict

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from tqdm import tqdm

from xla_trainer_models import BACKBONES
from xla_trainer_models.layers.probes import AttentiveProbe, Classification, FrozenEncoderProbe, LinearProbe, probe_features
from .config import Config, ConfigError
from .data import open_data
from .data.eval import EvalData
from .flops import peak_flops, train_flops_per_image
from .loop import (LogAndSaveSteps, NonFiniteSteps, StepSettings, TrainingJob, check_drift, hold_output_dir,
                   make_runtime, make_schedule, open_metrics, resume, run)
from .metrics import MetricsLogger
from .optim import build_optimizer, keep_unless
from .pretrained import load_backbone_state
from .runtime import Runtime

log = logging.getLogger(__name__)


# --- models -------------------------------------------------------------------------------------
def backbone_entry(cfg: Config):
    try:
        backbone = BACKBONES.get(cfg.backbone.name)
        backbone.check(cfg.backbone)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return backbone


def build_encoder(cfg: Config, num_classes: int = 0, keep_head: bool = False):
    """The backbone's classifier, its weights from train.init (random when null); its head is
    new unless keep_head (then train.init must hold one of num_classes outputs)."""
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
        if not keep_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a new task's head
        try:
            state = backbone.adapt_state(state, encoder)
        except (ValueError, RuntimeError) as e:  # e.g. a patch size the backbone does not resample
            raise ConfigError(f"train.init '{init}' does not fit backbone.* ({cfg.backbone}): {e}") from None
        mismatch = state_mismatch(state, encoder.state_dict(), keep_head)
        if mismatch:
            raise ConfigError(f"train.init '{init}' does not fit backbone.* ({cfg.backbone}): {mismatch}")
        encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s", init)
    return encoder


def state_mismatch(state: dict, own: dict, keep_head: bool) -> str | None:
    """How `state` does not fit a model whose state_dict is `own` (the first keys of each kind:
    shapes, missing, unexpected; a head is missing by design unless keep_head), or None."""
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and (keep_head or not k.startswith("head."))]
    unexpected = [k for k in state if k not in own]
    found = [f"{what} {keys[:3]}" for what, keys in (("shapes differ:", wrong), ("missing", missing),
                                                     ("unexpected", unexpected)) if keys]
    return "; ".join(found) or None


def build_classifier(cfg: Config, mode: str, num_classes: int) -> torch.nn.Module:
    if mode in ("train", "finetune"):
        return build_encoder(cfg, num_classes)
    encoder = build_encoder(cfg)
    check_probe_blocks(cfg, encoder)
    dim = encoder.num_features
    probe = LinearProbe(dim, num_classes) if mode == "linprobe" else AttentiveProbe(dim, num_classes, cfg.probe.heads)
    return FrozenEncoderProbe(encoder, probe, cfg.probe.blocks)


def make_ema(cfg: Config, classifier, runtime: Runtime):
    """timm's ModelEmaV3 of the classifier (train.ema: its decay, constant, no warmup, as DeiT's
    ModelEma), or None. Data-parallel only: an FSDP-wrapped model is not deep-copied."""
    if cfg.train.ema is None:
        return None
    if getattr(runtime, "fsdp_size", 1) > 1:
        raise ConfigError("train.ema keeps a whole copy of the weights, which FSDP does not shard: use a "
                          "data-parallel runtime.mesh ([-1, 1]) or train.ema=null")
    return ModelEmaV3(classifier, decay=cfg.train.ema)


def check_probe_blocks(cfg: Config, encoder):
    blocks = cfg.probe.blocks
    if blocks is None:
        return
    depth = len(getattr(encoder, "blocks", ()))
    if not hasattr(encoder, "forward_intermediates") or not 1 <= blocks <= depth:
        raise ConfigError(f"probe.blocks {blocks}: the mean of the last blocks' outputs needs 1 <= probe.blocks <= "
                          f"{depth} (the depth) and a classifier with forward_intermediates "
                          f"(backbone {cfg.backbone.name!r}); null takes its final features")


def example_batch(cfg: Config, num_classes: int) -> dict:
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
def check_classifier_config(cfg: Config):
    t = cfg.train
    if t.epochs < 1 or t.log_every < 1 or t.eval_every < 1:
        raise ConfigError("train.epochs, train.log_every and train.eval_every must be >= 1")
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError(f"train.ema {t.ema} is a decay: it must lie in (0, 1) (DeiT's: 0.99996), or null for none")
    if t.ema is not None and cfg.task in ("linprobe", "attnprobe"):
        raise ConfigError("train.ema averages trained weights: a probe's encoder is frozen; set train.ema=null")
    if cfg.task == "train" and t.init:
        raise ConfigError(f"`train` trains a classifier from scratch, but train.init is '{t.init}'; "
                          f"use `finetune` to start from those weights, or pass train.init=null")
    backbone_entry(cfg)


def train_classifier(cfg: Config) -> dict:
    """train (a classifier from scratch), finetune (every weight, from train.init), linprobe or
    attnprobe (a probe on the frozen encoder): train on data train/, evaluate on val/ every
    train.eval_every epochs; keep the last and the best checkpoints; resume from the last one in
    train.output_dir. cfg.task says which."""
    check_classifier_config(cfg)
    mode = cfg.task
    runtime = make_runtime(cfg)
    out = cfg.train.output_dir.rstrip("/")
    data = open_data(cfg, runtime)  # checked before the run directory is touched
    with hold_output_dir(runtime, out, cfg.train.take_over) as lock, contextlib.ExitStack() as closing:
        last, best = runtime.checkpoints(out, cfg.train.keep_checkpoints), runtime.checkpoints(f"{out}/best", 1)
        for store in (last, best):
            closing.callback(store.close)
        if last.latest():  # a resume under another config fails before anything is built
            check_drift(last, last.latest(), cfg.to_dict(), cfg.train.allow_resume_change, mode, runtime)
        result, state, logger = _train_classifier(cfg, mode, runtime, data, last, best, lock, closing)
    best_step = best.latest()
    return {"mode": mode, **{f"val_{k}": v for k, v in result.items()},
            "best_top1": state["best_top1"], "best_epoch": state["best_epoch"],
            "best_checkpoint": best.location(best_step) if best_step else None,
            "metrics": str(logger.path), "compiles": runtime.compiles()}


def _train_classifier(cfg: Config, mode: str, runtime: Runtime, data: EvalData, last, best, lock, closing):
    """train_classifier's body, inside its run lock: (the last evaluation, the best-so-far state,
    the metrics log)."""
    out = cfg.train.output_dir.rstrip("/")
    schedule = make_schedule(cfg, data.train_len)
    classifier = build_classifier(cfg, mode, data.num_classes)
    objective = Classification(classifier)
    flops = None
    if peak_flops(runtime.device_kind()):
        flops = train_flops_per_image(objective, None, example_batch(cfg, data.num_classes))
    ema = make_ema(cfg, classifier, runtime)  # a copy of the weights before any wrapper
    wrapped = runtime.wrap_model(objective, BACKBONES.get(cfg.backbone.name).blocks)
    o, t = cfg.optim, cfg.train
    optimizer = build_optimizer(classifier, schedule.peak_lr, o.weight_decay, o.betas, o.name,
                                o.layer_decay if mode == "finetune" else 1.0, o.momentum,
                                **runtime.optimizer_options())
    runtime.init_optimizer_state(optimizer)
    if ema is not None:
        ema.module.to(runtime.device)
        runtime.shard_like(ema.module.state_dict().values(), classifier.state_dict().values())
    job = TrainingJob(mode, classifier, wrapped, optimizer, schedule,
                      StepSettings(1, o.clip_grad, t.global_batch, t.seed), flops=flops,
                      ema=None if ema is None else lambda applied: update_ema(ema, classifier, applied))

    state = {"step": 0, "best_top1": -1.0, "best_epoch": 0, "config": cfg.to_dict()}
    with_ema = lambda extra: extra if ema is None else {**extra, "ema": ema.module.state_dict()}
    start, extra = resume(last, job, with_ema(dict(state)), cfg.to_dict(), t.allow_resume_change, runtime)
    if extra and ema is not None:
        ema.module.load_state_dict(extra.pop("ema"))
    state = extra or state
    total = schedule.total_steps
    logger = open_metrics(runtime, out, start, cfg.to_dict())
    closing.callback(logger.close)
    eval_fn = runtime.compile_fn(eval_step, "eval_step")
    result = {}

    def evaluate_at_epoch_end(done: int):
        nonlocal result
        epoch, rest = divmod(done, schedule.steps_per_epoch)
        if rest or (epoch % t.eval_every and done != total):
            return
        with runtime.gathered(wrapped):  # the classifier inside the wrapped objective, called on its own
            result = evaluate(classifier, eval_fn, runtime, data)
        if ema is not None:  # the average's accuracy beside the weights' (DeiT's "EMA" row)
            result.update({f"ema_{k}": v for k, v in evaluate(ema.module, eval_fn, runtime, data).items()
                           if k != "images"})
        if result["top1"] > state["best_top1"]:
            state.update(best_top1=result["top1"], best_epoch=epoch)
            best.save(done, classifier, optimizer, dict(state, step=done))
        logger.log({"step": done, "epoch": epoch, **{f"val_{k}": v for k, v in result.items()},
                    "best_top1": state["best_top1"]}, group="val")

    nonfinite = NonFiniteSteps(t.nonfinite, t.max_skipped_steps, state.get("skipped_steps", 0))
    run(job, runtime, runtime.device_batches(data.train(start, total)), last, logger, start=start, end=total,
        log_and_save=LogAndSaveSteps(t.log_every, schedule.steps_per_epoch, log_at_epoch_end=True),
        extra_state=lambda done: with_ema(dict(state, step=done)), nonfinite=nonfinite,
        after_step=evaluate_at_epoch_end, output_dir=out, lock=lock)
    return result, state, logger


def update_ema(ema: ModelEmaV3, model: torch.nn.Module, applied: torch.Tensor):
    """The moving average moved towards `model`'s weights, unless the step was not applied."""
    tensors = list(ema.module.state_dict().values())
    old = [t.detach().clone() for t in tensors]
    ema.update(model)
    keep_unless(applied, tensors, old)


def evaluate_checkpoint(cfg: Config) -> dict:
    """Top-1 / top-5 on data val/ of the classifier stored at train.init, its own head included
    (e.g. an official Adventurer checkpoint), under the eval transform: resize the short side to
    data.eval_resize, center-crop backbone.image_size (224 / 256: crop ratio 0.875)."""
    check_classifier_config(cfg)
    if not cfg.train.init:
        raise ConfigError("evaluating a classifier needs its weights: set train.init")
    runtime = make_runtime(cfg)
    data = open_data(cfg, runtime)
    classifier = build_encoder(cfg, data.num_classes, keep_head=True).to(runtime.device)
    result = evaluate(classifier, runtime.compile_fn(eval_step, "eval_step"), runtime, data)
    return {"mode": "eval", **{f"val_{k}": v for k, v in result.items()}, "compiles": runtime.compiles()}


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


def knn(cfg: Config) -> dict:
    """Cosine k-NN on frozen pooled features (probe.k neighbours, votes weighted by
    exp(cos / probe.temperature)): the bank is the train split under the eval transform."""
    check_classifier_config(cfg)
    runtime = make_runtime(cfg)
    data = open_data(cfg, runtime)
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
