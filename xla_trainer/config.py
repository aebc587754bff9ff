"""The experiment config: typed sections with defaults, a YAML file on top, `key.sub=value`
overrides on top of that. Unknown keys and wrong types fail here, before anything is built."""
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "digpt" / "demo.yaml"


class ConfigError(ValueError):
    """Bad user input, reported before any model is built or compiled."""


@dataclass
class ModelConfig:
    method: str = "digpt"
    backbone: str = "base"  # tiny | small | base | large | huge
    image_size: int = 224
    patch_size: int = 16
    width: Optional[int] = None  # override the backbone size's width / depth / heads
    depth: Optional[int] = None
    heads: Optional[int] = None
    segments: list = field(default_factory=lambda: [2, 2])  # segment rows, cols
    taps: Optional[list] = None  # encoder blocks fed to the decoders; null = 6,8,10,12 of 12
    decoder_width: int = 1024
    decoder_depth: int = 2
    decoder_heads: int = 32
    shared_tap_norm: bool = True  # official: one LayerNorm shared by the taps
    cls_visible_to_last_segment: bool = True  # official mask-padding quirk


@dataclass
class TeacherConfig:
    arch: str = "ViT-H-14"  # an open_clip architecture
    pretrained: Optional[str] = None  # open_clip tag, local file or gs:// URL; null = random init
    cache_dir: str = "~/.cache/xla-trainer/teachers"


@dataclass
class DataConfig:
    source: str = "imagefolder"  # imagefolder | embedded (built from images shipped in packages) | shards
    root: Optional[str] = None  # holds train/<class>/<image>; embedded: where to build it
    shards: Optional[str] = None  # source=shards: local or gs:// prefix holding manifest.json + tars
    shuffle_buffer: int = 1000  # samples per loader worker (shards)
    num_workers: int = 4
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class TargetsConfig:
    source: str = "online"  # online: the teacher runs in the step | precomputed: read from shards
    prefix: Optional[str] = None  # target shards (local or gs://), one per image shard
    num_views: int = 1  # precompute-targets: augmented views stored per image
    dtype: str = "float16"  # float16 | int8 (with a scale per token)
    batch_size: int = 64  # precompute-targets: images per teacher forward


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
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


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # auto | xla | cuda | cpu
    precision: str = "bf16"  # bf16 | fp32
    torch_compile: bool = False  # cuda only
    compile_cache: Optional[str] = None  # xla: persistent compilation cache directory (TPU)
    mesh: list = field(default_factory=lambda: [-1, 1])  # xla: [data, fsdp]; [1, -1] = FSDP, -1 = the rest
    slices: int = 1  # xla: TPU slices; > 1 makes a HybridMesh, data axis over DCN


class Sections:
    """A whole experiment: one dataclass field per config section; CHOICES: the allowed values of
    the keys that have a fixed set."""
    CHOICES: typing.ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Config(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    CHOICES: typing.ClassVar[dict] = {
        "model.backbone": ("tiny", "small", "base", "large", "huge"),
        "data.source": ("imagefolder", "embedded", "shards"),
        "targets.source": ("online", "precomputed"),
        "targets.dtype": ("float16", "int8"),
        "runtime.backend": ("auto", "xla", "cuda", "cpu"),
        "runtime.precision": ("bf16", "fp32"),
    }


# --- evaluation: finetune, linprobe, attnprobe, knn --------------------------------------------
@dataclass
class EncoderConfig:
    backbone: str = "base"  # tiny | small | base | large | huge (a timm VisionTransformer)
    image_size: int = 224
    patch_size: int = 16
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    drop_path: float = 0.1  # finetune only
    # weights: our pre-training checkpoint (file, checkpoint directory or output_dir), an official
    # D-iGPT pre-training / fine-tuning checkpoint, or a timm ViT state_dict; null = random init
    init: Optional[str] = None


@dataclass
class EvalDataConfig:
    source: str = "imagefolder"  # imagefolder (root/train, root/val) | digits (scikit-learn's, upscaled) | shards
    root: Optional[str] = None  # holds train/<class>/<image> and val/<class>/<image>; digits: where to write it
    shards: Optional[str] = None  # source=shards: local or gs:// prefix holding train/ and val/, each from make-shards
    shuffle_buffer: int = 1000  # samples per loader worker (shards)
    num_workers: int = 8
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    eval_resize: int = 256  # val: resize the short side to this, then center-crop model.image_size


@dataclass
class AugmentConfig:
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null = none
    random_erasing: float = 0.25
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    label_smoothing: float = 0.1


@dataclass
class EvalOptimConfig:
    name: str = "adamw"  # adamw | sgd | lars
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256
    layer_decay: float = 0.65  # finetune: lr x layer_decay^(depth - layer); 1 = off
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd, lars
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    clip_grad: Optional[float] = None


@dataclass
class ProbeConfig:
    heads: int = 16  # attnprobe: heads of the attentive pooling
    k: int = 20  # knn: neighbours
    temperature: float = 0.07  # knn: vote weight exp(cos / temperature)


@dataclass
class EvalTrainConfig:
    epochs: int = 100
    global_batch: int = 1024
    eval_batch: int = 1024  # global; the last val batch is padded to it (no recompilation)
    seed: int = 0
    output_dir: str = "runs/finetune"  # local path or gs:// URL
    log_every: int = 50
    eval_every: int = 1  # epochs
    keep_checkpoints: int = 1  # newest "last" checkpoints kept; the best one is kept apart


@dataclass
class EvalConfig(Sections):
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: EvalOptimConfig = field(default_factory=EvalOptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: EvalTrainConfig = field(default_factory=EvalTrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    CHOICES: typing.ClassVar[dict] = {
        "model.backbone": Config.CHOICES["model.backbone"],
        "data.source": ("imagefolder", "digits", "shards"),
        "optim.name": ("adamw", "sgd", "lars"),
        "runtime.backend": Config.CHOICES["runtime.backend"],
        "runtime.precision": Config.CHOICES["runtime.precision"],
    }


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            keys += _all_keys(f.type, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, schema) -> ConfigError:
    keys = _all_keys(schema)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(keys)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value, annotation):
    """Check `value` against the field's annotation; accept ints for floats and numeric strings
    (YAML reads 1e-4 as a string)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if t is list and isinstance(value, (list, tuple)):
            return list(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r} ({type(value).__name__})")


def _apply(section, values: dict, prefix: str, schema):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            while isinstance(value, dict) and len(value) == 1:  # name the whole key: optimizer.lr
                (sub, value), = value.items()
                key += f".{sub}"
            raise _unknown_key(key, schema)
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".", schema)
            continue
        value = _coerce(key, value, fields[name].type)
        choices = schema.CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        setattr(section, name, value)


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


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=Config,
                default: Path = DEFAULT_CONFIG):
    """A `schema` (Config, or EvalConfig for the evaluations) from `path` (else `default`), then
    the overrides."""
    cfg = schema()
    path = Path(path) if path else default
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; see {CONFIG_DIR} for the shipped configs")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    _apply(cfg, _parse_yaml(text, str(path)) or {}, "", schema)
    for text in overrides:
        _apply(cfg, parse_override(text), "", schema)
    return cfg
