"""Checkpoints to a local directory or any fsspec URL (gs://...): written under a temporary name
and moved into place once complete, so a crash never leaves a half checkpoint that resume picks."""
import io
import re

import fsspec
import torch
from torch.utils._pytree import tree_map

from .config import ConfigError
from .data.remote_io import list_names, remove_temporaries, write_bytes_atomic

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


def distributed_steps(output_dir: str) -> list[int]:
    """Steps under <output_dir>/checkpoints/ (DistributedCheckpoints' layout), whole or not."""
    return sorted(int(n) for n in list_names(output_dir.rstrip("/") + "/checkpoints") if n.isdigit())


def check_checkpoint_format(output_dir: str, backend: str):
    """Refuse a run directory holding the other backend's checkpoints: resuming would start at
    step 0 and drop the old run's metrics rows. (Until one format serves every backend.)"""
    files, steps = list_checkpoints(output_dir), distributed_steps(output_dir)
    if backend == "xla" and files:
        name = files[-1].rsplit("/", 1)[-1]
        raise ConfigError(f"train.output_dir '{output_dir}' holds checkpoints of the cpu/cuda backends "
                          f"({name}), which the xla backend cannot resume (it writes checkpoints/<step>/); "
                          f"resume it with runtime.backend=cpu or cuda, or pass another train.output_dir")
    if backend != "xla" and steps:
        raise ConfigError(f"train.output_dir '{output_dir}' holds checkpoints of the xla backend "
                          f"(checkpoints/{steps[-1]}/), which the {backend} backend cannot resume (it writes "
                          f"checkpoint-<step>.pt); resume it with runtime.backend=xla, or pass another "
                          f"train.output_dir")


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str, step: int, state: dict, keep: int) -> str:
    buffer = io.BytesIO()
    torch.save(to_cpu(state), buffer)
    final = f"{output_dir.rstrip('/')}/checkpoint-{step:08d}.pt"
    write_bytes_atomic(final, buffer.getvalue())
    fs, _ = _fs(output_dir)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        fs.rm(_fs(old)[1])
    return final


def load_checkpoint(path: str) -> dict:
    with fsspec.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


class FileCheckpoints:
    """`checkpoint-<step>.pt` files written whole by process 0 (DDP, CPU, single-host XLA)."""

    def __init__(self, output_dir: str, keep: int, is_main: bool):
        self.output_dir, self.keep, self.is_main = output_dir, keep, is_main
        if is_main:  # a save killed mid-write left its temporary file
            remove_temporaries(output_dir, lambda name: PATTERN.fullmatch(name) is not None)

    def latest(self) -> int | None:
        path = latest_checkpoint(self.output_dir)
        return int(PATTERN.search(path).group(1)) if path else None

    def location(self, step: int) -> str:
        return f"{self.output_dir.rstrip('/')}/checkpoint-{step:08d}.pt"

    def save(self, step: int, model, optimizer, extra: dict):
        state = {"model": model_state(model), "optimizer": optimizer.state_dict(), **extra}
        if self.is_main:
            save_checkpoint(self.output_dir, step, state, self.keep)

    def restore(self, step: int, model, optimizer, template: dict) -> dict:
        state = load_checkpoint(self.location(step))
        load_model_state(model, state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def close(self):
        pass
