"""The experiment config: one schema for every task (pretrain, train, finetune, linprobe,
attnprobe, knn, eval), typed sections with defaults, the task's own defaults on top
(TASK_DEFAULTS), a YAML file on top of those, `key.sub=value` overrides on top of that. Keys of
other tasks (ONLY_FOR), unknown keys, wrong types, numbers out of bounds (a section's BOUNDS;
no float key takes nan or inf) and output paths that cannot be directories fail here, before
anything is built."""
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# The shipped configs: configs/ of the checkout, or the copy a non-editable install puts inside
# the package (pyproject.toml's package-dir)
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = next((p for p in (_HERE / "configs", _HERE.parent / "configs") if (p / "digpt" / "demo.yaml").is_file()),
                  _HERE / "configs")
DEFAULT_CONFIG = CONFIG_DIR / "digpt" / "demo.yaml"


class ConfigError(ValueError):
    """Bad user input, reported before any model is built or compiled."""


def plugin(kind: str, default: str):
    """A config section chosen by its `name` from the registry of `kind` (objective, backbone,
    teacher): the entry's own Config dataclass, so its keys are checked like any other."""
    return field(default_factory=lambda: registry(kind).get(default).Config(), metadata={"registry": kind})


def registry(kind: str):
    import xla_trainer_models as models  # on first use: the registries import torch, timm and open_clip
    return {"objective": models.OBJECTIVES, "backbone": models.BACKBONES, "teacher": models.TEACHERS}[kind]


@dataclass
class DataConfig:
    # pretrain: imagefolder | embedded (built from images shipped in packages) | shards;
    # classifiers: imagefolder (root/train, root/val) | digits (scikit-learn's, upscaled) | shards
    source: str = "imagefolder"
    # holds train/<class>/<image> (classifiers: and val/<class>/<image>); embedded, digits: where to build it
    root: Optional[str] = None
    # source=shards: local or gs:// prefix holding manifest.json + tars (classifiers: train/ and val/,
    # each from make-shards)
    shards: Optional[str] = None
    shuffle_buffer: int = 1000  # samples per loader worker (shards)
    num_workers: int = 4  # loader worker processes; -1: one per core of this process, less one
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # pretrain: RandomResizedCrop's aspect ratios
    eval_resize: int = 256  # classifiers' val: resize the short side to this, then center-crop backbone.image_size
    # classifiers: each image this many times in a row per epoch, each copy augmented anew (DeiT: 3)
    # (data.eval.classifier_data checks it)
    repeated_aug: int = 1
    BOUNDS: typing.ClassVar[dict] = {"shuffle_buffer": ">= 1", "num_workers": ">= -1; -1: one per core",
                                     "crop_scale": "(0, 1] range", "crop_ratio": "> 0 range", "eval_resize": ">= 1"}


@dataclass
class TargetsConfig:
    source: str = "online"  # online: the teacher runs in the step | precomputed: read from shards
    prefix: Optional[str] = None  # target shards (local or gs://), one per image shard
    num_views: int = 1  # precompute-targets: augmented views stored per image
    dtype: str = "float16"  # float16 | int8 (with a scale per token)
    batch_size: int = 64  # precompute-targets: images per teacher forward
    BOUNDS: typing.ClassVar[dict] = {"num_views": ">= 1", "batch_size": ">= 1"}


@dataclass
class AugmentConfig:
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null = none
    # DeiT III's ThreeAugment instead of RandAugment: crop + flip, one of grayscale / solarize /
    # blur, then ColorJitter(color_jitter)
    three_augment: bool = False
    color_jitter: Optional[float] = None  # brightness = contrast = saturation; null = none
    random_erasing: float = 0.25
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    label_smoothing: float = 0.1
    BOUNDS: typing.ClassVar[dict] = {"color_jitter": ">= 0", "random_erasing": "[0, 1]; a probability",
                                     "mixup": ">= 0; 0 = off", "cutmix": ">= 0; 0 = off", "label_smoothing": "[0, 1)"}


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lars (classifiers; pre-training is AdamW)
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: Optional[float] = None  # the peak lr itself, not scaled by the batch (XTRA); wins over base_lr
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # finetune: lr x layer_decay^(depth - layer); 1 = off
    momentum: float = 0.9  # sgd, lars
    warmup_epochs: float = 40.0
    warmup_from: float = 0.0  # the warmup starts at this fraction of the peak lr (XTRA: 0.1)
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    # step: warmup + cosine per iteration; epoch: the lr changes only at epoch starts, timm's
    # CosineLRScheduler with t_in_epochs=True (DeiT-style recipes: Adventurer)
    schedule_unit: str = "step"
    BOUNDS: typing.ClassVar[dict] = {
        "base_lr": ">= 0", "lr": ">= 0", "betas": "[0, 1) pair", "weight_decay": ">= 0",
        "layer_decay": "(0, 1]; 1 = off", "momentum": "[0, 1)", "warmup_epochs": ">= 0",
        "warmup_from": "[0, 1]; a fraction of the peak lr", "min_lr": ">= 0", "clip_grad": "> 0; null for none"}


@dataclass
class ProbeConfig:
    heads: int = 16  # attnprobe: heads of the attentive pooling
    k: int = 20  # knn: neighbours
    temperature: float = 0.07  # knn: vote weight exp(cos / temperature)
    # features: null = the classifier's final ones; N = the mean of its last N block outputs
    # before the final norm (AIM / XTRA: 6 for the attentive probe, 1 for the linear one)
    blocks: Optional[int] = None
    BOUNDS: typing.ClassVar[dict] = {"heads": ">= 1", "k": ">= 1", "temperature": "> 0",
                                     "blocks": ">= 1; null for none"}


@dataclass
class TrainConfig:
    # the keys that guard a long run (docs/long-runs.md): a step whose loss, gradient norm or
    # update is not finite is never applied (weights and optimizer state stay as they were);
    # stop: exit 3 at the next log step, nothing newer saved | skip: go on, counted in metrics as
    # skipped_steps
    nonfinite: str = "stop"
    max_skipped_steps: int = 20  # nonfinite=skip: stop (exit 3) after this many non-finite steps in a row
    # keys a resume may change although they alter the schedule or the data order (e.g.
    # [train.global_batch]); a change of the model or the loss never resumes
    allow_resume_change: list = field(default_factory=list)
    take_over: bool = False  # take the output_dir's run lock over from a holder that is stale (see docs)
    epochs: int = 300
    global_batch: int = 4096
    accum_steps: int = 1  # pretrain: micro-batches per optimizer step
    eval_batch: int = 1024  # classifiers: global; the last val batch is padded to it (no recompilation)
    seed: int = 0
    output_dir: str = "runs/digpt"  # local path or gs:// URL
    log_every: int = 50
    ckpt_every: int = 1000  # pretrain (the classifiers save at every epoch's end)
    eval_every: int = 1  # classifiers: epochs
    # newest N kept; 0 keeps all (classifiers: of the "last" checkpoints; the best one is kept apart)
    keep_checkpoints: int = 2
    stop_at_step: Optional[int] = None  # pretrain: end early (debugging); the schedule is unchanged
    profile_steps: Optional[list] = None  # pretrain: [first, last): trace these steps into <output_dir>/profile
    # train / finetune: a moving average of the weights (timm's ModelEmaV3, updated in every step
    # with this decay; DeiT's recipes: 0.99996), evaluated beside them and kept in the checkpoints
    # (evaluate.check_classifier_config checks it)
    ema: Optional[float] = None
    # classifiers' weights: our pre-training checkpoint (file, checkpoint directory or output_dir),
    # an official D-iGPT pre-training / fine-tuning checkpoint, or a timm state_dict; null = random init
    init: Optional[str] = None
    BOUNDS: typing.ClassVar[dict] = {
        "max_skipped_steps": ">= 1", "epochs": ">= 1", "global_batch": ">= 1", "accum_steps": ">= 1",
        "eval_batch": ">= 1", "log_every": ">= 1", "ckpt_every": ">= 1", "eval_every": ">= 1",
        "keep_checkpoints": ">= 0; 0 keeps all", "stop_at_step": ">= 1; null for none", "profile_steps": ">= 0 span"}


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # auto | xla | cuda | cpu
    precision: str = "bf16"  # bf16 | fp32
    compile_cache: Optional[str] = None  # xla: persistent compilation cache directory (TPU)
    # [data, fsdp] over XLA's devices, or cuda's and cpu's processes: [-1, 1] data-parallel (DDP), [1, -1]
    # FSDP (XLA FSDPv2, eager FSDP2), both > 1: HSDP; -1 = the rest
    mesh: list = field(default_factory=lambda: [-1, 1])
    slices: int = 1  # xla: TPU slices; > 1 makes a HybridMesh, data axis over DCN
    # xla: the student's identical blocks run as one XLA loop (torch_xla scan): one block traced and
    # compiled instead of each (no drop path / dropout in them; data-parallel mesh only)
    scan_blocks: bool = False
    # xla: the step traced once by dynamo (torch.compile, openxla) into one graph and replayed at
    # every step, not re-traced in Python (AdamW, no train.ema; data-parallel mesh only)
    dynamo_step: bool = False
    # cuda and cpu: torch.compile of the objective's forward and backward (off: compile time)
    torch_compile: bool = False
    # cuda: the step's levers (runtime.py), on by default where exact
    tf32: bool = False  # TF32 for float32 matmuls and convolutions (not exact: 10 mantissa bits)
    fused_optimizer: bool = True  # fused AdamW: one kernel over every parameter
    attention_masks: str = "additive"  # additive: boolean `attn_mask` buffers made one additive mask at the start
    # SDPA kernels allowed; cuDNN's has had NaN and memory bugs at odd lengths
    sdpa_backends: list = field(default_factory=lambda: ["flash", "efficient"])
    ddp_static_graph: bool = True  # several processes: DDP's static graph (fewer hooks per step)
    CHOICES: typing.ClassVar[dict] = {"attention_masks": ("additive", "boolean")}
    BOUNDS: typing.ClassVar[dict] = {"slices": ">= 1"}


# --- the tasks ---------------------------------------------------------------------------------
PRETRAIN = ("pretrain",)
CLASSIFIERS = ("train", "finetune", "linprobe", "attnprobe", "knn", "eval")
TASKS = PRETRAIN + CLASSIFIERS

# The sections' defaults are pre-training's (D-iGPT's recipe); the classifier tasks start from these
# instead (MAE / DeiT fine-tuning's), applied before the YAML file.
_CLASSIFIER_DEFAULTS = {
    "data": {"num_workers": 8, "crop_scale": [0.08, 1.0]},
    "optim": {"base_lr": 1e-4, "betas": [0.9, 0.999], "warmup_epochs": 5.0, "min_lr": 1e-6},
    "train": {"epochs": 100, "global_batch": 1024, "output_dir": "runs/finetune", "keep_checkpoints": 1},
}
TASK_DEFAULTS = {"pretrain": {}, **{task: _CLASSIFIER_DEFAULTS for task in CLASSIFIERS}}

# Keys only some tasks read: set for another task (a misplaced section, a probe key in a pre-training
# config), they fail instead of being ignored.
ONLY_FOR = {
    **dict.fromkeys(("objective", "teacher", "targets", "data.crop_ratio", "train.accum_steps", "train.ckpt_every",
                     "train.stop_at_step", "train.profile_steps"), PRETRAIN),
    **dict.fromkeys(("augment", "probe", "data.eval_resize", "data.repeated_aug", "optim.name", "optim.layer_decay",
                     "optim.momentum", "train.eval_batch", "train.eval_every", "train.ema", "train.init"), CLASSIFIERS),
}

# pre-training reads unlabelled images (embedded: the demo photos), the classifiers labelled ones
DATA_SOURCES = {"pretrain": ("imagefolder", "embedded", "shards"),
                **{task: ("imagefolder", "digits", "shards") for task in CLASSIFIERS}}

# Commands that read other tasks' configs too: `eval` measures the classifier that a train or
# finetune config trained (its train.init, head included); `knn` the frozen backbone of any
# classifier config.
READS = {"eval": ("eval", "train", "finetune"), "knn": CLASSIFIERS}


@dataclass
class Config:
    """A whole experiment: `task` (the command that runs it) and one dataclass field per config
    section. CHOICES: the allowed values of the keys that have a fixed set (a section's own
    CHOICES name its keys without the section). A section's BOUNDS (plug-in sections' too) give
    the numbers each of its keys may take (see `check_bound`)."""
    task: str = "pretrain"  # the command that runs it (set by the subcommand): one of TASKS
    objective: Any = plugin("objective", "digpt")
    backbone: Any = plugin("backbone", "vit")
    teacher: Any = plugin("teacher", "openclip")  # only for an objective that needs a teacher
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    CHOICES: typing.ClassVar[dict] = {
        "targets.source": ("online", "precomputed"),
        "targets.dtype": ("float16", "int8"),
        "optim.name": ("adamw", "sgd", "lars"),
        "runtime.backend": ("auto", "xla", "cuda", "cpu"),
        "runtime.precision": ("bf16", "fp32"),
        "train.nonfinite": ("stop", "skip"),
        "optim.schedule_unit": ("step", "epoch"),
    }

    def choices(self, key: str) -> tuple | None:
        """The values `key` may take in this task (data.source: DATA_SOURCES), or None for any."""
        return DATA_SOURCES[self.task] if key == "data.source" else self.CHOICES.get(key)

    def takes(self, key: str) -> bool:
        """Whether this task reads `key` (a section or a section's key)."""
        return self.task in ONLY_FOR.get(key, ONLY_FOR.get(key.split(".")[0], TASKS))

    def to_dict(self) -> dict:
        """The keys this task reads: what checkpoints and the metrics log record."""
        return _taken(self, dataclasses.asdict(self), "")

    def check_given(self, given: set[str]):
        """Checks across sections, once every key is read; `given`: the keys the file and the
        overrides set."""
        stray = sorted(k for k in given if k.split(".")[0] in ("teacher", "targets"))
        if stray and not registry("objective").get(self.objective.name).needs_teacher:
            raise ConfigError(f"config key '{stray[0]}' is set, but objective '{self.objective.name}' has no "
                              f"teacher (its targets come from the images); remove the teacher and targets sections")


def _taken(cfg: Config, values: dict, prefix: str) -> dict:
    return {k: _taken(cfg, v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in values.items() if cfg.takes(prefix + k)}


def _all_keys(cfg: Config, section=None, prefix="") -> list[str]:
    """Every key the config's task reads: a plugin section lists the keys of its chosen entry."""
    section, keys = cfg if section is None else section, []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if not cfg.takes(key):
            continue
        if dataclasses.is_dataclass(value):
            keys += _all_keys(cfg, value, key + ".")
        else:
            keys.append(key)
    return keys


def _unknown_key(key: str, cfg: Config, where: str = "") -> ConfigError:
    keys = _all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(keys)}"
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


def _coerce(key: str, value, annotation):
    """Check `value` against the field's annotation; accept ints for floats and numeric strings
    (YAML reads 1e-4 as a string)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        number = None
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if t is float and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
        if t is list and isinstance(value, (list, tuple)):
            return list(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r} ({type(value).__name__})")


def _choose_entry(section, name: str, values, key: str, kind: str):
    """A plugin section whose `name` changes starts over from the new entry's defaults."""
    if not isinstance(values, dict) or "name" not in values or values["name"] == getattr(section, name).name:
        return
    try:
        setattr(section, name, registry(kind).get(str(values["name"])).Config())
    except ValueError as e:
        raise ConfigError(f"config key '{key}.name': {e}") from None


def _for_other_task(key: str, cfg: Config) -> ConfigError:
    tasks = ONLY_FOR.get(key) or ONLY_FOR[key.split(".")[0]]
    where = f"`xla-trainer {tasks[0]}`" if len(tasks) == 1 else f"the classifier tasks ({', '.join(tasks)})"
    return ConfigError(f"config key '{key}' is read only by {where}; a {cfg.task} config cannot set it: remove it, "
                       f"or run the task it belongs to")


def _apply(section, values: dict, prefix: str, cfg: Config, given: set):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys, got {values!r} "
                          f"({type(values).__name__})")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            while isinstance(value, dict) and len(value) == 1:  # name the whole key: optimizer.lr
                (sub, value), = value.items()
                key += f".{sub}"
            raise _unknown_key(key, cfg)
        if key == "task":
            raise ConfigError("config key 'task' is the command's: it is read from the file's top level, "
                              "never from an override")
        if not cfg.takes(key):
            raise _for_other_task(key, cfg)
        if "registry" in fields[name].metadata:
            _choose_entry(section, name, value, key, fields[name].metadata["registry"])
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".", cfg, given)
            continue
        value = _coerce(key, value, fields[name].type)
        choices = cfg.choices(key) or getattr(section, "CHOICES", {}).get(name)
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        setattr(section, name, value)
        given.add(key)


# --- bounds --------------------------------------------------------------------------------------
# A BOUNDS entry: an interval (">= 1", "> 0", "[0, 1)", "(0, 1]", ...) every number of the key must
# lie in (each number of a list key), then for a list key of two numbers "pair" (any two), "range"
# (min <= max) or "span" (first < last), then optionally "; note" for the message.
_BOUND = re.compile(r"(?:(?P<op>>=?) (?P<min>\S+)|(?P<left>[\[(])(?P<lo>[^,]+), (?P<hi>[^\])]+)(?P<right>[\])]))"
                    r"(?: (?P<shape>pair|range|span))?(?:; (?P<note>.+))?")


def check_bound(key: str, value, spec: str):
    """ConfigError naming `key`, its bounds and `value` when a number of `value` lies outside them."""
    b = _BOUND.fullmatch(spec)
    lo, hi = float(b["min"] or b["lo"]), float(b["hi"] or "inf")
    open_low, open_high = b["op"] == ">" or b["left"] == "(", b["right"] == ")"
    within = lambda v: (lo < v if open_low else lo <= v) and (v < hi if open_high else v <= hi)
    interval = f"{b['op']} {b['min']}" if b["op"] else f"in {b['left']}{b['lo']}, {b['hi']}{b['right']}"
    numbers = value if isinstance(value, list) else [value]
    shape = {"pair": "two numbers, each", "range": "[min, max] with min <= max, each",
             "span": "[first, last) with first < last, each", None: "a list of numbers, each"}[b["shape"]]
    wrong = (any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
             or not all(within(v) for v in numbers)
             or (b["shape"] and len(numbers) != 2)
             or (b["shape"] == "range" and numbers[0] > numbers[1])
             or (b["shape"] == "span" and numbers[0] >= numbers[1]))
    if wrong:
        what = f"{shape} {interval}" if isinstance(value, list) else interval
        note = f" ({b['note']})" if b["note"] else ""
        raise ConfigError(f"config key '{key}' must be {what}{note}, got {value!r}")


def _check_bounds(section, prefix: str = ""):
    bounds = getattr(section, "BOUNDS", {})
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".")
        elif f.name in bounds and value is not None:
            check_bound(key, value, bounds[f.name])


def blocking_file(path: str) -> Path | None:
    """The file that keeps a local `path` from being (or becoming) a directory: the path itself or
    the nearest of its parents that exists; None when there is none (or for a URL)."""
    if "://" in path:
        return None
    for p in (Path(path), *Path(path).parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def check_values(cfg: Config):
    """Every key's bounds; train.allow_resume_change naming config keys; a local
    train.output_dir that is or can become a directory."""
    _check_bounds(cfg)
    for key in cfg.train.allow_resume_change:
        if str(key) not in _all_keys(cfg) and key != "hosts":  # hosts: the process count (drift.py)
            raise _unknown_key(str(key), cfg, "train.allow_resume_change: ")
    out = cfg.train.output_dir
    blocker = blocking_file(out) if out else None
    if blocker is not None:
        where = "is a file" if str(blocker) == str(Path(out)) else f"lies under '{blocker}', which is a file"
        raise ConfigError(f"train.output_dir '{out}' {where}, not a directory; pass another train.output_dir "
                          f"(a new directory, or the output_dir of the run to resume)")


def _parse_yaml(text: str, where: str):
    """YAML, or a ConfigError naming `where` with the line and column of the fault."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise ConfigError(f"{where}{at}: malformed YAML: {what}") from None


def parse_override(text: str) -> dict:
    """'train.global_batch=64' -> {'train': {'global_batch': 64}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    nested = _parse_yaml(raw, f"override '{text}'") if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def shipped(path: str | Path) -> Path:
    """`path` itself when it exists, else the shipped config of that name ("configs/digpt/demo.yaml"
    or "digpt/demo.yaml"), so that the README's commands work from an installed package too."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    return CONFIG_DIR.joinpath(*parts) if parts and CONFIG_DIR.joinpath(*parts).is_file() else path


def read_sections(path: str | Path) -> dict:
    """The mapping of sections a config file holds, or a ConfigError naming the file and the fix."""
    path = shipped(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file, e.g. one under {CONFIG_DIR}")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; see {CONFIG_DIR} for the shipped configs")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    sections = _parse_yaml(text, str(path))
    if sections is not None and not isinstance(sections, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (train:, optim:, ...), "
                          f"found a {type(sections).__name__}: {str(sections)[:60]}")
    return sections or {}


def file_task(path: Path, sections: dict, task: str | None) -> str:
    """The task a config file runs: its `task:` key (else `task`, else pretrain), checked against
    `task`, the command that reads it."""
    found = sections.pop("task", None)
    if found is not None and found not in TASKS:
        raise ConfigError(f"config '{path}': task must be one of {TASKS}, got {found!r}")
    if task and found and found not in READS.get(task, (task,)):
        raise ConfigError(f"config '{path}' is a {found} config; run `xla-trainer {found}`")
    return task or found or "pretrain"


def load_config(path: str | Path | None = None, overrides: list[str] = (), task: str | None = None) -> Config:
    """The Config of `path` (else the D-iGPT demo), then the overrides. `task`: the command that
    reads it (None: the file's own task); the task's defaults come first (TASK_DEFAULTS)."""
    path = Path(path or DEFAULT_CONFIG)
    sections = read_sections(path)
    cfg = Config(task=file_task(path, sections, task))
    _apply(cfg, TASK_DEFAULTS[cfg.task], "", cfg, set())
    given = set()
    _apply(cfg, sections, "", cfg, given)
    for text in overrides:
        _apply(cfg, parse_override(text), "", cfg, given)
    check_values(cfg)
    cfg.check_given(given)
    return cfg
