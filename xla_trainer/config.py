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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.backbone": ("tiny", "small", "base", "large", "huge"),
    "data.source": ("imagefolder", "embedded", "shards"),
    "targets.source": ("online", "precomputed"),
    "targets.dtype": ("float16", "int8"),
    "runtime.backend": ("auto", "xla", "cuda", "cpu"),
    "runtime.precision": ("bf16", "fp32"),
}


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            keys += _all_keys(f.type, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_all_keys(Config))}"
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


def _apply(section, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            while isinstance(value, dict) and len(value) == 1:  # name the whole key: optimizer.lr
                (sub, value), = value.items()
                key += f".{sub}"
            raise _unknown_key(key)
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
            continue
        value = _coerce(key, value, fields[name].type)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {CHOICES[key]}, got {value!r}")
        setattr(section, name, value)


def parse_override(text: str) -> dict:
    """'train.global_batch=64' -> {'train': {'global_batch': 64}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    nested = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; see {CONFIG_DIR} for the shipped configs")
    with open(path) as f:
        _apply(cfg, yaml.safe_load(f) or {}, "")
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    return cfg
