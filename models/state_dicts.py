"""Small helpers over state_dicts (name -> tensor) that several converters share."""
import math
import re

import torch


# prefixes of training wrappers: DistributedDataParallel / DeepSpeed, Lightning < 2.1 under DeepSpeed
WRAPPER_PREFIXES = ("module.", "_forward_module.")


def strip_wrapper_prefixes(state: dict) -> dict:
    """A state_dict saved from a training wrapper (every key under `module.` or
    `_forward_module.`, maybe both) without it."""
    for prefix in WRAPPER_PREFIXES * 2:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def param_names(*modules: str) -> set[str]:
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


def count_indexed(state: dict, prefix: str) -> int:
    """Number of indexed submodules `prefix<i>.` among the keys (max index + 1)."""
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(found) + 1 if found else 0


def check_keys(state: dict, expected: set[str], what: str):
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"not {what}: missing keys {short_list(missing)}, unexpected keys {short_list(unexpected)}")


def short_list(names: list[str], limit: int = 12) -> str:
    return str(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def fuse_qkv(state: dict, prefix: str) -> dict:
    """Separate `<prefix><i>.attn.{q,k,v}.{weight,bias}` fused into timm's `attn.qkv` (rows q, k, v)."""
    out = dict(state)
    for key in [k for k in state if k.startswith(prefix) and re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        parts = [out.pop(key.replace(".attn.q.", f".attn.{n}.")) for n in "qkv"]
        out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
    return out


def split_qkv(state: dict, prefix: str) -> dict:
    """fuse_qkv undone."""
    out = dict(state)
    for key in [k for k in state if k.startswith(prefix) and re.search(r"\.attn\.qkv\.(weight|bias)$", k)]:
        for name, part in zip("qkv", out.pop(key).chunk(3)):
            out[key.replace(".attn.qkv.", f".attn.{name}.")] = part
    return out
