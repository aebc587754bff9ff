"""Three registries: backbones, objectives and teachers. Each entry is a small class with its own
config dataclass (the config section of that name), so adding a system is new files plus configs.

A backbone entry gives
  student(cfg)            -> the encoder objectives train: `grid`, `patch_size` (pixels, (h, w)),
                             `embed_dim`, `depth`, `extra_tokens` (appended after the patch
                             tokens, e.g. cls), optionally `norm` (a final norm objectives may
                             apply to the last block's output; none when absent) and
                             forward_taps(images, token_index, attn_mask, taps) -> the outputs of
                             blocks `taps` over the patches `token_index` in that order, then the
                             extra tokens, under attn_mask (N + extra, N + extra), or one
                             per sample (B, 1, N + extra, N + extra: SDPA's layout), or None (full);
                             `causal_only` True: a causal scan over the given order (masks
                             ("causal",)), which objectives give no mask;
  classifier(cfg, n)      -> a timm-style classifier (forward_features, forward_head(pre_logits),
                             num_features, no_weight_decay, group_matcher for layer decay;
                             optionally forward_intermediates (the probes' probe.blocks, the
                             features `visualize` draws) and last_attention(images) -> (B, N),
                             the last block's cls (or mean) attention over the patches);
  import_state(state)     -> a checkpoint's backbone weights (ours, official, timm) in the
                             classifier's layout; adapt_state(state, classifier) -> fitted to its
                             resolution; export_state(state) -> the exported file's layout;
  blocks                  -> the module classes FSDP (and remat) wrap one at a time;
  masks                   -> the attention masks its student honours (MASKS);
  check(cfg), grid(cfg)   -> ValueError for sizes it cannot build; its (rows, cols) token grid.
An objective entry gives
  needs_teacher, mask     -> whether a teacher makes its targets; the mask it needs of a backbone;
  causal_student          -> True: a block-causal objective that also trains a causal-only
                             backbone, its tokens fed in segment order under the causal scan;
  check(cfg, grid)        -> ValueError for a config it cannot train on the backbone's token grid;
  build(cfg, student, targets) -> an nn.Module with `encoder`, `noise_shape` (per-sample uniform
                             noise drawn on the device, None for none) and
                             forward(batch, noise) -> {"loss": ..., other scalars}; optionally
                             no_weight_decay() -> parameter names AdamW must not decay;
                             `targets` is a TargetInfo of the teacher (None without one).
A teacher entry gives build(cfg, image_size) -> a frozen module with `dim`, `grid` and
forward(images) -> (B, 1 + Gh*Gw, dim) tokens, cls first, and cast_weights(dtype);
identity(cfg) -> (model, weights).

Entries of other packages register on import: XLA_TRAINER_PLUGINS=pkg.module,other.module.
"""
import dataclasses
import importlib
import os
from typing import Any, ClassVar

# Attention masks a student may be given: "full" (none), "causal" (token order), "block-causal"
# (full inside a block, causal between blocks), "arbitrary" (any boolean (N, N) mask).
MASKS = ("full", "causal", "block-causal", "arbitrary")


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """What an objective needs to know of its teacher's tokens: width and patch grid."""
    dim: int
    grid: tuple[int, int]


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str):
        def wrap(entry):
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            entry.name = name
            self._entries[name] = entry
            return entry
        return wrap

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def get(self, name: str):
        load_plugins()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]


class Entry:
    """Base of every registry entry: `Config` is its config section (a dataclass whose first
    field is `name`). The modules an entry builds take that config whole (e.g. Adventurer(cfg,
    num_classes)) and declare none of its fields again, so each default lives in one place."""
    name: ClassVar[str]
    Config: ClassVar[type]


class Backbone(Entry):
    masks: ClassVar[tuple[str, ...]] = ()
    blocks: ClassVar[tuple[type, ...]] = ()

    @staticmethod
    def check(cfg):
        """Raise ValueError for sizes this backbone cannot build (before anything is built); by
        default, an image_size its patch_size does not tile."""
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"backbone.image_size {cfg.image_size} is not a multiple of "
                             f"backbone.patch_size {cfg.patch_size}")

    @staticmethod
    def grid(cfg) -> tuple[int, int]:
        return (cfg.image_size // cfg.patch_size,) * 2

    @staticmethod
    def student(cfg):
        raise NotImplementedError

    @staticmethod
    def classifier(cfg, num_classes: int = 0):
        raise NotImplementedError

    @staticmethod
    def import_state(state: dict) -> dict:
        """A checkpoint's backbone in the classifier's layout: by default our pre-training
        checkpoints' `encoder.*` keys, else the state as it is."""
        if any(k.startswith("encoder.") for k in state):
            return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        return dict(state)

    @staticmethod
    def adapt_state(state: dict, classifier) -> dict:
        """An imported state made to fit `classifier` (e.g. positions resampled to its grid)."""
        return state

    @staticmethod
    def export_state(state: dict) -> dict:
        """The classifier-layout state as export writes it (by default, as it is)."""
        return dict(state)


class Objective(Entry):
    needs_teacher: ClassVar[bool] = False
    mask: ClassVar[str] = "full"
    causal_student: ClassVar[bool] = False

    @staticmethod
    def check(cfg, grid: tuple[int, int]):
        """Raise ValueError for what this objective cannot train (before anything is built)."""

    @staticmethod
    def build(cfg, student, targets: TargetInfo | None):
        raise NotImplementedError


class Teacher(Entry):
    @staticmethod
    def build(cfg, image_size: int):
        raise NotImplementedError

    @staticmethod
    def identity(cfg) -> tuple[str, str | None]:
        """(model, weights): what precomputed target manifests record and are checked against;
        by default the section's `arch` and `pretrained` keys."""
        return cfg.arch, cfg.pretrained


BACKBONES = Registry("backbone")
OBJECTIVES = Registry("objective")
TEACHERS = Registry("teacher")

_loaded: set[str] = set()


def load_plugins():
    """Import the modules named in XLA_TRAINER_PLUGINS (comma-separated), once each."""
    for module in filter(None, (m.strip() for m in os.environ.get("XLA_TRAINER_PLUGINS", "").split(","))):
        if module not in _loaded:
            _loaded.add(module)
            importlib.import_module(module)


def check_pairing(objective, backbone):
    """An objective whose mask the backbone cannot honour is refused before anything is built; a
    causal-only backbone trains an objective that declares causal_student (a block-causal mask
    relaxed to causal inside each block)."""
    if objective.mask in backbone.masks or (objective.causal_student and "causal" in backbone.masks):
        return
    hint = (f"; {objective.name!r} cannot feed a causal scan its tokens in causal order (an objective "
            f"that can declares causal_student, as digpt and xtra do)" if "causal" in backbone.masks else "")
    raise ValueError(f"objective {objective.name!r} needs a {objective.mask} attention mask, which "
                     f"backbone {backbone.name!r} cannot take (it takes: {', '.join(backbone.masks)}); "
                     f"pick another backbone.name or objective.name{hint}")
