"""Test fixtures of every registered entry (the built-ins and toy_plugins.py's), keyed by registry
kind and entry name: TINY, overrides of its config that give a model small enough for 2 CPU
cores; INVALID, an override its check must refuse. A new entry adds its rows here."""
import dataclasses

from xla_trainer_models.registry import Backbone, Objective, Teacher

TINY = {
    "backbone": {
        "vit": {"size": "tiny", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
        "crate_alpha": {"size": "tiny", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
        "adventurer": {"size": "tiny", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "d_state": 8,
                       "headdim": 16, "chunk_size": 8, "drop_path": 0.0},
        "toy": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2},
    },
    "objective": {
        "digpt": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
        "xtra": {"block": [2, 2], "proj_hidden": 64, "predictor_depth": 1, "predictor_heads": 2, "head_hidden": 64},
        "saim": {"query_depth": 1},
        "toy": {},
    },
    "teacher": {
        "openclip": {"arch": "demo-ViT-T-8"},
        "timm": {"arch": "vit_tiny_patch16_224"},
    },
}

INVALID = {
    "backbone": {
        "vit": {"patch_size": 5},
        "crate_alpha": {"patch_size": 5},
        "adventurer": {"headdim": 48},  # 2 x 32 = 64 inner channels do not split into heads of 48
        "toy": {"patch_size": 5},
    },
    "objective": {
        "digpt": {"segments": [3, 3]},
        "xtra": {"block": [3, 3]},
        "saim": {"order": "raster"},
        "toy": {"keep": 0.0},
    },
}


def kind(entry) -> str:
    """The registry an entry belongs to: backbone, objective or teacher."""
    return next(name for base, name in ((Backbone, "backbone"), (Objective, "objective"), (Teacher, "teacher"))
                if issubclass(entry, base))


def tiny(entry, **extra):
    """The entry's config at its TINY size, then `extra`."""
    return dataclasses.replace(entry.Config(), **{**TINY[kind(entry)][entry.name], **extra})


def invalid(entry, **extra):
    """The entry's TINY config with the INVALID override its check must refuse."""
    return tiny(entry, **{**INVALID[kind(entry)][entry.name], **extra})
