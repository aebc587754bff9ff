"""Config drift on resume: a run resumes only under the config it was saved with, but for keys that
change nothing it trains (where it logs, how often it saves, which backend or mesh runs it).

- A key of the model or the loss (the objective, backbone, teacher and probe sections, train.ema,
  the task) never resumes under another value: the checkpoint's tensors and curve belong to it.
- A key of the schedule or the data order (batch, epochs, lr keys, seed, the data, precision, and
  for streamed shards the worker count, shuffle buffer and hosts) resumes only when
  train.allow_resume_change names it; then the change is logged.
"""
import logging

from .config import ConfigError

log = logging.getLogger(__name__)

# Keys that change no parameter, loss, schedule or data order: a resume may change them freely.
OPERATIONAL = {
    "train.output_dir", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.stop_at_step",
    "train.profile_steps", "train.nonfinite", "train.max_skipped_steps", "train.allow_resume_change",
    "train.take_over", "train.eval_every", "train.eval_batch", "train.init", "teacher.cache_dir",
    "targets.batch_size", "runtime.backend", "runtime.compile_cache", "runtime.mesh", "runtime.slices",
    "runtime.torch_compile", "runtime.fused_optimizer", "runtime.attention_masks", "runtime.sdpa_backends",
    "runtime.ddp_static_graph", "runtime.scan_blocks", "runtime.dynamo_step"}  # the last two: the same step, traced otherwise
MODEL_SECTIONS = ("objective", "backbone", "teacher", "probe")
MODEL_KEYS = {"train.ema", "task"}
# Streamed shards are dealt to hosts x loader workers and shuffled in a buffer: these change their
# order. The other sources' order depends on (seed, step) alone.
SHARD_ORDER = ("data.num_workers", "data.shuffle_buffer", "hosts")


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def identity(config: dict, task: str, processes: int) -> dict:
    """What a checkpoint records of its run, flat: the config, the task and the process count."""
    return {**flatten(config), "task": task, "hosts": processes}


def changed_keys(saved: dict, current: dict) -> dict:
    """key -> (saved value, current value) for the keys a resume must not change silently."""
    shards = current.get("data.source") == "shards"
    free = OPERATIONAL | (set() if shards else set(SHARD_ORDER))
    return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if k not in free and k in saved and saved.get(k) != current.get(k)}


def is_model_key(key: str) -> bool:
    return key.split(".")[0] in MODEL_SECTIONS or key in MODEL_KEYS


def check_resume(saved: dict, current: dict, allowed: list[str], checkpoint: str):
    """ConfigError listing the changed keys (old -> new) unless each is allowed; a change of the
    model or the loss is never allowed. `saved`, `current`: identity()'s dicts. A checkpoint from
    before the config was saved with it has nothing to compare."""
    if not saved:
        return
    changes = changed_keys(saved, current)
    listing = lambda keys: ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)
    model = [k for k in changes if is_model_key(k)]
    if model:
        raise ConfigError(f"{checkpoint} was saved under another model or loss ({listing(model)}); a checkpoint "
                          f"cannot resume under them: restore those values, or start a new train.output_dir")
    refused = [k for k in changes if k not in allowed]
    if refused:
        raise ConfigError(f"resuming {checkpoint} with {listing(refused)} changes the schedule or the data order; "
                          f"restore the saved values, or pass train.allow_resume_change=[{','.join(refused)}] "
                          f"to resume anyway")
    if changes:
        log.warning("resuming %s with %s (train.allow_resume_change)", checkpoint, listing(list(changes)))
