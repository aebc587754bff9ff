"""The CLIP teacher: OpenCLIP's visual tower, frozen, in eval mode, returning all final tokens
(cls + patch grid) after ln_post and the projection: D-iGPT's targets."""
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip
import safetensors
import safetensors.torch
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import resize_pos_embed
from torch import nn

from ..registry import TEACHERS, Teacher
from ..state_dicts import strip_wrapper_prefixes
from .frozen import FrozenTeacher

# Small architectures of our own (e.g. the demo teacher) next to open_clip's registry.
open_clip.add_model_config(Path(__file__).parent / "clip_configs")



def resolve_weights(pretrained: str | None, cache_dir: str) -> str | None:
    """A gs:// (or any fsspec URL) checkpoint is copied once into cache_dir; local paths and
    open_clip pretrained tags pass through."""
    if not pretrained or "://" not in pretrained:
        return pretrained
    import fsspec
    local = Path(cache_dir) / hashlib.sha1(pretrained.encode()).hexdigest()[:16] / Path(pretrained).name
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(local.suffix + ".partial")
        with fsspec.open(pretrained, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(tmp, local)
    return str(local)


def read_visual_state(path: str) -> dict | None:
    """The visual tower's state_dict (keys without `visual.`) when the file holds only that
    tower, bare or under `visual.`, possibly in {"state_dict": ...} and/or with DDP's `module.`
    prefix; None for a full CLIP checkpoint (or a format only open_clip reads), which open_clip
    then loads itself."""
    try:
        state = _unwrap(_open_lazily(path))
    except (RuntimeError, pickle.UnpicklingError):  # e.g. OpenAI's TorchScript archives
        return None
    prefixed = [k.startswith("visual.") for k in state or {}]
    if state is None or (any(prefixed) and not all(prefixed)):  # other towers too: full CLIP
        return None
    if path.endswith(".safetensors"):
        state = _unwrap(safetensors.torch.load_file(path))
    return {k.removeprefix("visual."): v for k, v in state.items()}


def _open_lazily(path: str):
    """A torch file memory-mapped; of a safetensors file only the names (values None): enough to
    tell a full checkpoint (e.g. ViT-H's 4 GB) without reading it twice."""
    if path.endswith(".safetensors"):
        with safetensors.safe_open(path, "pt") as f:
            return dict.fromkeys(f.keys())
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _unwrap(state) -> dict | None:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    return strip_wrapper_prefixes(state)


def load_visual_state(clip: nn.Module, state: dict, what: str):
    """Strict load into clip.visual, the position grid resized to the model's (as open_clip does
    for full checkpoints)."""
    prefixed = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(prefixed, clip)
    try:
        clip.visual.load_state_dict({k[len("visual."):]: v for k, v in prefixed.items()})
    except RuntimeError as e:
        raise ValueError(f"{what}: not an OpenCLIP visual tower of this arch: {e}") from None


@dataclass
class OpenClipConfig:
    name: str = "openclip"
    arch: str = "ViT-H-14"  # an open_clip architecture
    pretrained: Optional[str] = None  # open_clip tag, local file or gs:// URL; null = random init
    cache_dir: str = "~/.cache/xla-trainer/teachers"


class ClipTeacher(FrozenTeacher):
    def __init__(self, cfg: OpenClipConfig, image_size: int):
        super().__init__()
        if cfg.arch not in open_clip.list_models():
            raise ValueError(f"unknown teacher arch {cfg.arch!r}; see open_clip.list_models()")
        weights = resolve_weights(cfg.pretrained, os.path.expanduser(cfg.cache_dir))
        visual_state = read_visual_state(weights) if weights and os.path.isfile(weights) else None
        clip = open_clip.create_model(cfg.arch, pretrained=None if visual_state is not None else weights,
                                      force_image_size=image_size, device=torch.get_default_device())
        if visual_state is not None:
            load_visual_state(clip, visual_state, f"teacher {cfg.arch!r} from {cfg.pretrained}")
        self.visual = clip.visual
        if self.visual.attn_pool is not None or self.visual.proj is None:
            raise ValueError(f"teacher {cfg.arch!r}: only plain ViT towers with a projection are supported")
        self.freeze(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)

    def cast_weights(self, dtype: torch.dtype):
        """The tower's weights in `dtype`; the input normalisation stays float32."""
        self.visual.to(dtype)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def dim(self) -> int:
        return self.visual.proj.shape[1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) student-normalised -> (B, 1 + Gh*Gw, dim) tokens, cls first."""
        x = self.visual._embeds(self.renormalise(images))
        x = self.visual.ln_post(self.visual.transformer(x))
        return x @ self.visual.proj


@TEACHERS.register("openclip")
class OpenClip(Teacher):
    Config = OpenClipConfig

    @staticmethod
    def build(cfg: OpenClipConfig, image_size: int) -> ClipTeacher:
        return ClipTeacher(cfg, image_size)
