"""The official CRATE-alpha PyTorch weights (UCSC-VLAA/CRATE-alpha, torch_inference: a raw
state_dict, e.g. crate_alpha_B16.pth) <-> our CrateAlpha. Pure functions over dicts of tensors.

Theirs: conv1, cls_token, pos_embedding (cls row first), transformer.layers.{i}.0 (PreNorm MSSA:
norm, fn.qkv, fn.to_out.0), transformer.layers.{i}.1 (PreNorm ODL: norm, fn.D, fn.D1), mlp_head.0
(the final LayerNorm, eps 1e-5 in the port, 1e-6 in JAX), mlp_head.1 (the head).
"""
import re

from ..state_dicts import check_keys, count_indexed

# official key <-> ours; {i} a layer index, {p} weight or bias, {d} a dictionary
_PAIRS = [
    ("conv1.{p}", "patch_embed.proj.{p}"),
    ("pos_embedding", "pos_embed"),
    ("cls_token", "cls_token"),
    ("transformer.layers.{i}.0.norm.{p}", "blocks.{i}.norm1.{p}"),
    ("transformer.layers.{i}.0.fn.qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("transformer.layers.{i}.0.fn.to_out.0.weight", "blocks.{i}.attn.proj.weight"),
    ("transformer.layers.{i}.1.norm.{p}", "blocks.{i}.norm2.{p}"),
    ("transformer.layers.{i}.1.fn.{d}", "blocks.{i}.odl.{d}"),
    ("mlp_head.0.{p}", "norm.{p}"),
    ("mlp_head.1.{p}", "head.{p}"),
]
_FIELDS = {"i": r"\d+", "p": "weight|bias", "d": "D1|D"}


def is_official(state: dict) -> bool:
    return "conv1.weight" in state and any(k.startswith("transformer.layers.") for k in state)


def official_keys(depth: int, head: bool = True) -> set[str]:
    """Every key of the official port's state_dict of this depth (with or without a head)."""
    keys = set()
    for theirs, _ in _PAIRS:
        if theirs.startswith("mlp_head.1") and not head:
            continue
        for i in range(depth if "{i}" in theirs else 1):
            for p in ("weight", "bias") if "{p}" in theirs else ("",):
                for d in ("D", "D1") if "{d}" in theirs else ("",):
                    keys.add(theirs.format(i=i, p=p, d=d))
    return keys


def crate_from_official(state: dict) -> dict:
    """The official port's state_dict -> ours, every key accounted for."""
    check_keys(state, official_keys(count_indexed(state, "transformer.layers."), "mlp_head.1.weight" in state),
               "an official CRATE-alpha state_dict")
    return {_rename(k, 0): v for k, v in state.items()}


def crate_to_official(state: dict) -> dict:
    """Ours -> the official port's layout (what its inference code loads)."""
    return {_rename(k, 1): v for k, v in state.items()}


def _rename(key: str, side: int) -> str:
    """`key` of side 0 (official) or 1 (ours) under the name the other side gives it."""
    for pair in _PAIRS:
        pattern = re.escape(pair[side])
        for name, values in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{values})")
        m = re.fullmatch(pattern, key)
        if m:
            return pair[1 - side].format(**m.groupdict())
    raise ValueError(f"{key}: not a key of a CRATE-alpha model")
