"""Pre-trained weights in and out (the file side of the backbones' import_state / export_state),
local paths or fsspec URLs (gs://) alike.

read_state_dict understands: torch files (.pt/.pth/.bin) holding a state_dict bare or under
"model" / "state_dict" / "module" (DDP's `module.` prefix stripped), which covers the official
pre-training checkpoints and timm / OpenCLIP files; safetensors files; our checkpoint directories
<output_dir>/checkpoints/<step>/ (their "model" entries only, read on the CPU in this process, no
process group needed); and an output_dir, whose newest checkpoint it reads.
"""
import argparse
import io

import safetensors.torch
import torch

from xla_trainer_models.state_dicts import strip_wrapper_prefixes

from .checkpoint import is_distributed_checkpoint, newest_checkpoint, read_checkpoint
from .data.remote_io import exists, filesystem, read_bytes, write_bytes_atomic

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WRAPPERS = ("model", "state_dict", "module")  # where training scripts keep the state_dict


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state_dict (name -> tensor, on the CPU) stored at `path`: see the module doc."""
    fs, local = filesystem(path)
    if not fs.exists(local):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if fs.isdir(local):
        if is_distributed_checkpoint(path):
            return read_checkpoint(path, ("model",))["model"]
        newest = newest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(
                f"{path}: a directory without a checkpoint; expected a distributed checkpoint "
                f"(<step>/ with .metadata) or an output_dir with checkpoints/<step>/")
        return read_state_dict(newest)
    if path.endswith(".safetensors"):
        return safetensors.torch.load(read_bytes(path))
    if path.endswith(TORCH_SUFFIXES):
        return _unwrap(_torch_load(path), path)
    raise ValueError(f"{path}: unknown weights format; expected a {'/'.join(TORCH_SUFFIXES)} or "
                     f".safetensors file or a checkpoint directory")


def load_backbone_state(path: str, backbone) -> dict[str, torch.Tensor]:
    """The backbone stored at `path` in its classifier's layout (the registry entry's
    import_state: for the ViT, timm's VisionTransformer(global_pool='avg', fc_norm=True))."""
    state = read_state_dict(path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} of its {len(state)} tensors hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"take an earlier checkpoint of the run")
    try:
        return backbone.import_state(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def export_backbone(src: str, out: str, backbone) -> dict[str, torch.Tensor]:
    """Write the backbone stored at `src` to `out` (.safetensors, or a torch file by suffix) in
    the entry's export layout: for the ViT, the state_dict of
    timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=out),
    global_pool='avg', fc_norm=True). Written atomically; returns the state_dict written."""
    if not out.endswith((".safetensors", *TORCH_SUFFIXES)):
        raise ValueError(f"{out}: expected a .safetensors or {'/'.join(TORCH_SUFFIXES)} file name")
    if exists(out):
        raise FileExistsError(f"{out} exists already and is left as it is; pass another output name")
    state = backbone.export_state(load_backbone_state(src, backbone))
    state = {k: v.contiguous() for k, v in state.items()}
    if out.endswith(".safetensors"):
        data = safetensors.torch.save(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    write_bytes_atomic(out, data)
    return state


def _torch_load(path: str):
    data = read_bytes(path)
    # Tensors and plain containers only; the official checkpoints also hold their argparse args.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError, depending on the file
        raise ValueError(f"{path}: not a torch file of tensors and plain containers: {e}") from None


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        found = f"keys {list(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a state_dict (name -> tensor), bare or under one of "
                         f"{WRAPPERS}; found {found}")
    return strip_wrapper_prefixes(obj)
