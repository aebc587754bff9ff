"""Checkpoints to a local directory or any fsspec URL (gs://...): written under a temporary name
and moved into place once complete, so a crash never leaves a half checkpoint that resume picks."""
import io
import re

import fsspec
import torch
from torch.utils._pytree import tree_map

PATTERN = re.compile(r"checkpoint-(\d{8})\.pt$")


def to_cpu(tree):
    return tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, tree)


def model_state(module: torch.nn.Module) -> dict:
    """The state_dict under the model's own names, whatever wrappers (FSDPv2's `_orig_module`)
    the runtime put inside it: checkpoints move between meshes."""
    return {k.replace("_orig_module.", ""): v for k, v in module.state_dict().items()}


def load_model_state(module: torch.nn.Module, state: dict):
    names = {k.replace("_orig_module.", ""): k for k in module.state_dict()}
    module.load_state_dict({names.get(k, k): v for k, v in state.items()})


def _fs(output_dir: str):
    return fsspec.core.url_to_fs(output_dir)


def list_checkpoints(output_dir: str) -> list[str]:
    fs, root = _fs(output_dir)
    if not fs.exists(root):
        return []
    names = [p for p in fs.ls(root, detail=False) if PATTERN.search(p)]
    return [fs.unstrip_protocol(p) if "://" in output_dir else p for p in sorted(names)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str, step: int, state: dict, keep: int) -> str:
    fs, root = _fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(to_cpu(state), buffer)
    final = f"{root}/checkpoint-{step:08d}.pt"
    tmp = f"{root}/.checkpoint-{step:08d}.pt.tmp"
    fs.pipe_file(tmp, buffer.getvalue())
    fs.mv(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        fs.rm(_fs(old)[1])
    return fs.unstrip_protocol(final) if "://" in output_dir else final


def load_checkpoint(path: str) -> dict:
    with fsspec.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
