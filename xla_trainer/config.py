"""The experiment config: typed sections with defaults, a YAML file on top, `key.sub=value`
overrides on top of that. Unknown keys, wrong types, numbers out of bounds (a section's BOUNDS;
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
    source: str = "imagefolder"  # imagefolder | embedded (built from images shipped in packages) | shards
    root: Optional[str] = None  # holds train/<class>/<image>; embedded: where to build it
    shards: Optional[str] = None  # source=shards: local or gs:// prefix holding manifest.json + tars
    shuffle_buffer: int = 1000  # samples per loader worker (shards)
    num_workers: int = 4  # loader worker processes; -1: one per core of this process, less one
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop's aspect ratios
    BOUNDS: typing.ClassVar[dict] = {"shuffle_buffer": ">= 1", "num_workers": ">= -1; -1: one per core",
                                     "crop_scale": "(0, 1] range", "crop_ratio": "> 0 range"}


@dataclass
class TargetsConfig:
    source: str = "online"  # online: the teacher runs in the step | precomputed: read from shards
    prefix: Optional[str] = None  # target shards (local or gs://), one per image shard
    num_views: int = 1  # precompute-targets: augmented views stored per image
    dtype: str = "float16"  # float16 | int8 (with a scale per token)
    batch_size: int = 64  # precompute-targets: images per teacher forward
    BOUNDS: typing.ClassVar[dict] = {"num_views": ">= 1", "batch_size": ">= 1"}


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: Optional[float] = None  # the peak lr itself, not scaled by the batch (XTRA); wins over base_lr
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    warmup_from: float = 0.0  # the warmup starts at this fraction of the peak lr (XTRA: 0.1)
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    # step: warmup + cosine per iteration; epoch: the lr changes only at epoch starts, timm's
    # CosineLRScheduler with t_in_epochs=True (DeiT-style recipes: Adventurer)
    schedule_unit: str = "step"
    BOUNDS: typing.ClassVar[dict] = {
        "base_lr": ">= 0", "lr": ">= 0", "betas": "[0, 1) pair", "weight_decay": ">= 0", "warmup_epochs": ">= 0",
        "warmup_from": "[0, 1]; a fraction of the peak lr", "min_lr": ">= 0", "clip_grad": "> 0; null for none"}


@dataclass
class LongRunConfig:
    """The train keys of every training task that guard a long run (docs/long-runs.md)."""
    # a step whose loss, gradient norm or update is not finite is never applied (weights and
    # optimizer state stay as they were); stop: exit 3 at the next log step, nothing newer saved |
    # skip: go on, counted in metrics as skipped_steps
    nonfinite: str = "stop"
    max_skipped_steps: int = 20  # nonfinite=skip: stop (exit 3) after this many non-finite steps in a row
    # keys a resume may change although they alter the schedule or the data order (e.g.
    # [train.global_batch]); a change of the model or the loss never resumes
    allow_resume_change: list = field(default_factory=list)
    take_over: bool = False  # take the output_dir's run lock over from a holder that is stale (see docs)
    BOUNDS: typing.ClassVar[dict] = {"max_skipped_steps": ">= 1"}


@dataclass
class TrainConfig(LongRunConfig):
    epochs: int = 300
    global_batch: int = 4096
    accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0
    output_dir: str = "runs/digpt"  # local path or gs:// URL
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # newest N kept; 0 keeps all
    stop_at_step: Optional[int] = None  # end early (debugging); the schedule is unchanged
    profile_steps: Optional[list] = None  # [first, last): trace these steps into <output_dir>/profile
    BOUNDS: typing.ClassVar[dict] = {
        "epochs": ">= 1", "global_batch": ">= 1", "accum_steps": ">= 1", "log_every": ">= 1", "ckpt_every": ">= 1",
        "keep_checkpoints": ">= 0; 0 keeps all", "stop_at_step": ">= 1; null for none",
        "profile_steps": ">= 0 span", **LongRunConfig.BOUNDS}


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # auto | xla | cuda | cpu
    precision: str = "bf16"  # bf16 | fp32
    compile_cache: Optional[str] = None  # xla: persistent compilation cache directory (TPU)
    mesh: list = field(default_factory=lambda: [-1, 1])  # xla: [data, fsdp]; [1, -1] = FSDP, -1 = the rest
    slices: int = 1  # xla: TPU slices; > 1 makes a HybridMesh, data axis over DCN
    # cuda: the step's levers (runtime.DdpRuntime), on by default where exact
    torch_compile: bool = False  # torch.compile of the objective's forward and backward (off: compile time)
    tf32: bool = False  # TF32 for float32 matmuls and convolutions (not exact: 10 mantissa bits)
    fused_optimizer: bool = True  # fused AdamW: one kernel over every parameter
    attention_masks: str = "additive"  # additive: boolean `attn_mask` buffers made one additive mask at the start
    # SDPA kernels allowed; cuDNN's has had NaN and memory bugs at odd lengths
    sdpa_backends: list = field(default_factory=lambda: ["flash", "efficient"])
    ddp_static_graph: bool = True  # several processes: DDP's static graph (fewer hooks per step)
    CHOICES: typing.ClassVar[dict] = {"attention_masks": ("additive", "boolean")}
    BOUNDS: typing.ClassVar[dict] = {"slices": ">= 1"}


class Sections:
    """A whole experiment: one dataclass field per config section; CHOICES: the allowed values of
    the keys that have a fixed set (a section's own CHOICES name its keys without the section);
    MOVED: old key -> new key, for a one-line migration message. A section's BOUNDS (plug-in
    sections' too) give the numbers each of its keys may take (see `check_bound`)."""
    CHOICES: typing.ClassVar[dict] = {}
    MOVED: typing.ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_given(self, given: set[str]):
        """Checks across sections, once every key is read; `given`: the keys the file and the
        overrides set."""


# Keys of the configs before objectives, backbones and teachers had sections of their own.
_MOVED_MODEL = {f"model.{k}": f"backbone.{k}" for k in ("image_size", "patch_size", "width", "depth", "heads",
                                                         "drop_path")}
_MOVED_MODEL["model.backbone"] = "backbone.size"


@dataclass
class Config(Sections):
    objective: Any = plugin("objective", "digpt")
    backbone: Any = plugin("backbone", "vit")
    teacher: Any = plugin("teacher", "openclip")  # only for an objective that needs a teacher
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    MOVED: typing.ClassVar[dict] = {
        **_MOVED_MODEL, "model.method": "objective.name",
        **{f"model.{k}": f"objective.{k}" for k in ("segments", "taps", "decoder_width", "decoder_depth",
                                                    "decoder_heads", "shared_tap_norm", "cls_visible_to_last_segment")}}
    CHOICES: typing.ClassVar[dict] = {
        "data.source": ("imagefolder", "embedded", "shards"),
        "targets.source": ("online", "precomputed"),
        "targets.dtype": ("float16", "int8"),
        "runtime.backend": ("auto", "xla", "cuda", "cpu"),
        "runtime.precision": ("bf16", "fp32"),
        "train.nonfinite": ("stop", "skip"),
        "optim.schedule_unit": ("step", "epoch"),
    }

    def check_given(self, given: set[str]):
        stray = sorted(k for k in given if k.split(".")[0] in ("teacher", "targets"))
        if stray and not registry("objective").get(self.objective.name).needs_teacher:
            raise ConfigError(f"config key '{stray[0]}' is set, but objective '{self.objective.name}' has no "
                              f"teacher (its targets come from the images); remove the teacher and targets sections")


# --- evaluation: finetune, linprobe, attnprobe, knn --------------------------------------------
@dataclass
class EvalDataConfig:
    source: str = "imagefolder"  # imagefolder (root/train, root/val) | digits (scikit-learn's, upscaled) | shards
    root: Optional[str] = None  # holds train/<class>/<image> and val/<class>/<image>; digits: where to write it
    shards: Optional[str] = None  # source=shards: local or gs:// prefix holding train/ and val/, each from make-shards
    shuffle_buffer: int = 1000  # samples per loader worker (shards)
    num_workers: int = 8
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    eval_resize: int = 256  # val: resize the short side to this, then center-crop model.image_size
    repeated_aug: int = 1  # each image this many times in a row per epoch, each copy augmented anew (DeiT: 3)
    # (repeated_aug: open_eval_data checks it)
    BOUNDS: typing.ClassVar[dict] = {"shuffle_buffer": ">= 1", "num_workers": ">= -1; -1: one per core",
                                     "crop_scale": "(0, 1] range", "eval_resize": ">= 1"}


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
class EvalOptimConfig:
    name: str = "adamw"  # adamw | sgd | lars
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256
    lr: Optional[float] = None  # the peak lr itself, not scaled by the batch; wins over base_lr
    layer_decay: float = 0.65  # finetune: lr x layer_decay^(depth - layer); 1 = off
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd, lars
    warmup_epochs: float = 5.0
    warmup_from: float = 0.0  # the warmup starts at this fraction of the peak lr (XTRA's probes: 0.1)
    min_lr: float = 1e-6
    clip_grad: Optional[float] = None
    schedule_unit: str = "step"  # step | epoch (see OptimConfig)
    BOUNDS: typing.ClassVar[dict] = {**OptimConfig.BOUNDS, "layer_decay": "(0, 1]; 1 = off", "momentum": "[0, 1)"}


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
class EvalTrainConfig(LongRunConfig):
    epochs: int = 100
    global_batch: int = 1024
    eval_batch: int = 1024  # global; the last val batch is padded to it (no recompilation)
    seed: int = 0
    output_dir: str = "runs/finetune"  # local path or gs:// URL
    log_every: int = 50
    eval_every: int = 1  # epochs
    keep_checkpoints: int = 1  # newest "last" checkpoints kept; the best one is kept apart
    # train / finetune: a moving average of the weights (timm's ModelEmaV3, updated in every step
    # with this decay; DeiT's recipes: 0.99996), evaluated beside them and kept in the checkpoints
    ema: Optional[float] = None
    # weights: our pre-training checkpoint (file, checkpoint directory or output_dir), an official
    # D-iGPT pre-training / fine-tuning checkpoint, or a timm state_dict; null = random init
    init: Optional[str] = None
    # (ema: evaluate.check_eval_config checks it)
    BOUNDS: typing.ClassVar[dict] = {
        "epochs": ">= 1", "global_batch": ">= 1", "eval_batch": ">= 1", "log_every": ">= 1", "eval_every": ">= 1",
        "keep_checkpoints": ">= 0; 0 keeps all", **LongRunConfig.BOUNDS}


@dataclass
class EvalConfig(Sections):
    """Supervised training (`train`), fine-tuning, the probes and k-NN of a backbone's classifier."""
    backbone: Any = plugin("backbone", "vit")
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: EvalOptimConfig = field(default_factory=EvalOptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: EvalTrainConfig = field(default_factory=EvalTrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    MOVED: typing.ClassVar[dict] = {**_MOVED_MODEL, "model.init": "train.init"}
    CHOICES: typing.ClassVar[dict] = {
        "data.source": ("imagefolder", "digits", "shards"),
        "optim.name": ("adamw", "sgd", "lars"),
        "runtime.backend": Config.CHOICES["runtime.backend"],
        "runtime.precision": Config.CHOICES["runtime.precision"],
        "train.nonfinite": Config.CHOICES["train.nonfinite"],
        "optim.schedule_unit": Config.CHOICES["optim.schedule_unit"],
    }


def _all_keys(section, prefix="") -> list[str]:
    """Every key of a config instance: a plugin section lists the keys of its chosen entry."""
    keys = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, cfg, where: str = "") -> ConfigError:
    if key in cfg.MOVED:
        return ConfigError(f"{where}config key '{key}' is now '{cfg.MOVED[key]}' (objectives, backbones and "
                           f"teachers have sections of their own); rename it, as in {DEFAULT_CONFIG}")
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


def _apply(section, values: dict, prefix: str, cfg, given: set):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys, got {values!r} "
                          f"({type(values).__name__})")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            moved = [f"{key}.{sub}" for sub in value if f"{key}.{sub}" in cfg.MOVED] if isinstance(value, dict) else []
            if moved:  # an old section: name its first moved key
                raise _unknown_key(moved[0], cfg)
            while isinstance(value, dict) and len(value) == 1:  # name the whole key: optimizer.lr
                (sub, value), = value.items()
                key += f".{sub}"
            raise _unknown_key(key, cfg)
        if "registry" in fields[name].metadata:
            _choose_entry(section, name, value, key, fields[name].metadata["registry"])
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".", cfg, given)
            continue
        value = _coerce(key, value, fields[name].type)
        choices = cfg.CHOICES.get(key) or getattr(section, "CHOICES", {}).get(name)
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


def check_values(cfg):
    """Every key's bounds; train.allow_resume_change naming config keys; a local
    train.output_dir that is or can become a directory."""
    _check_bounds(cfg)
    train = getattr(cfg, "train", None)
    for key in getattr(train, "allow_resume_change", ()):
        if str(key) not in _all_keys(cfg) and key != "hosts":  # hosts: the process count (drift.py)
            raise _unknown_key(str(key), cfg, "train.allow_resume_change: ")
    out = getattr(train, "output_dir", None)
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


def read_sections(path: str | Path) -> dict:
    """The mapping of sections a config file holds, or a ConfigError naming the file and the fix."""
    path = Path(path)
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


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=Config,
                default: Path = DEFAULT_CONFIG):
    """A `schema` (Config, or EvalConfig for the evaluations) from `path` (else `default`), then
    the overrides."""
    cfg, given = schema(), set()
    _apply(cfg, read_sections(path or default), "", cfg, given)
    for text in overrides:
        _apply(cfg, parse_override(text), "", cfg, given)
    check_values(cfg)
    cfg.check_given(given)
    return cfg
