"""State-dict mappings between the official D-iGPT checkpoints (OliverRensu/D-iGPT, DiGPT_torch),
our DiGPT and timm's standard ViT. Pure functions over dicts of tensors; reading and writing
files is xla_trainer/pretrained.py's job.

Layouts:
* official pre-training (models_digpt.py): encoder keys as in timm, pos_embed (1, 1+N, C) with a
  zero cls row first; per decoder d in (ar, kd): d_enc2dec, d_enc_norm.{0..3} (one LayerNorm
  listed once per tap), d_blocks.i.*, d_token, d_norm, d_pred; decoder_pos_embed; buffer mask.
* official fine-tuning (models_vit.py): a timm ViT with cls first, fc_norm and head.
* ours: encoder.* (SegmentViT, pos_embed (1, N, C) without a cls row) and decoders.{ar,kd}.*.
* timm target: VisionTransformer(class_token=True, global_pool='avg', fc_norm=True), cls first.
"""
import math
import re

import torch
from timm.models.vision_transformer import VisionTransformer

from .pos_embed import sincos_2d

DECODERS = ("ar", "kd")
_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# official DecoderBlock submodule -> ours (models/decoder.py)
_DECODER_BLOCK = {
    "norm1": "norm1", "attn1.qkv": "self_attn.qkv", "attn1.proj": "self_attn.proj",
    "norm2_1": "norm2_q", "norm2_2": "norm2_kv", "attn2.q": "cross_attn.q",
    "attn2.kv": "cross_attn.kv", "attn2.proj": "cross_attn.proj", "norm2": "norm3",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
# official per-decoder module -> ours, inside decoders.<d>
_DECODER_MODULES = {"enc2dec": "enc2dec", "norm": "head_norm", "pred": "head"}
# keys of the official pre-training model and of our DiGPT that no encoder needs
_DECODER_KEY = re.compile(r"^((ar|kd)_|decoder_pos_embed$|mask$|decoders\.|tap_norm\.)")


def strip_ddp_prefix(state: dict) -> dict:
    """A state_dict saved from DistributedDataParallel (every key under `module.`) without it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _params(*modules: str) -> set[str]:
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


def _count(state: dict, prefix: str) -> int:
    """Number of indexed submodules `prefix<i>.` among the keys (max index + 1)."""
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _check_keys(state: dict, expected: set[str], what: str):
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"not {what}: missing keys {_short(missing)}, unexpected keys {_short(unexpected)}")


def _short(names: list[str], limit: int = 12) -> str:
    return str(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def official_pretrain_keys(depth: int, decoder_depth: int, num_taps: int) -> set[str]:
    """Every key of the official DiGPT pre-training state_dict of these depths."""
    keys = {"cls_token", "pos_embed", "decoder_pos_embed", "mask"} | _params("patch_embed.proj")
    keys |= _params(*(f"blocks.{i}.{m}" for i in range(depth) for m in _BLOCK))
    for d in DECODERS:
        keys |= {f"{d}_token"} | _params(*(f"{d}_{m}" for m in _DECODER_MODULES))
        keys |= _params(*(f"{d}_enc_norm.{j}" for j in range(num_taps)))
        keys |= _params(*(f"{d}_blocks.{i}.{m}" for i in range(decoder_depth) for m in _DECODER_BLOCK))
    return keys


def digpt_from_official(state: dict, shared_tap_norm: bool = True) -> dict:
    """The official DiGPT pre-training state_dict -> the state_dict of our DiGPT
    (models.create_method("digpt", ...) of the same dims, taps and shared_tap_norm), for a strict load.

    Checked on the way: the copies of each decoder's tap norm are one LayerNorm; the cls row of
    pos_embed is zero (our encoder has none); decoder_pos_embed is MAE's sin-cos, which our
    decoders rebuild as a fixed buffer instead of loading it."""
    depth, decoder_depth = _count(state, "blocks."), _count(state, "ar_blocks.")
    num_taps = _count(state, "ar_enc_norm.")
    _check_keys(state, official_pretrain_keys(depth, decoder_depth, max(num_taps, 1)),
                "an official D-iGPT pre-training state_dict")
    out = {f"encoder.{k}": v for k, v in state.items() if k in _params("patch_embed.proj")
           or k == "cls_token" or k.startswith("blocks.")}
    out["encoder.pos_embed"] = _drop_zero_cls_row(state["pos_embed"], "pos_embed")
    _check_decoder_pos_embed(state["decoder_pos_embed"])
    for d in DECODERS:
        out.update(_official_decoder(state, d, decoder_depth, num_taps, shared_tap_norm))
    return out


def _drop_zero_cls_row(pos_embed: torch.Tensor, name: str) -> torch.Tensor:
    if pos_embed.abs().amax(dim=-1)[0, 0] != 0:
        raise ValueError(f"{name}: expected a zero cls row first (the official sin-cos layout)")
    return pos_embed[:, 1:]


def _check_decoder_pos_embed(pos_embed: torch.Tensor):
    side = _square_side(pos_embed.shape[1] - 1)
    if side is None:
        raise ValueError(f"decoder_pos_embed {tuple(pos_embed.shape)}: expected 1 + a square grid of rows")
    ours = sincos_2d((side, side), pos_embed.shape[-1])
    rows = _drop_zero_cls_row(pos_embed, "decoder_pos_embed")[0]
    if not torch.allclose(rows.float(), ours, atol=1e-5):
        raise ValueError("decoder_pos_embed differs from the sin-cos embedding our decoders use")


def _official_decoder(state: dict, d: str, depth: int, num_taps: int, shared_tap_norm: bool) -> dict:
    ours = f"decoders.{d}"
    out = {f"{ours}.query_token": state[f"{d}_token"]}
    for theirs, mine in _DECODER_MODULES.items():
        out.update({f"{ours}.{mine}.{p}": state[f"{d}_{theirs}.{p}"] for p in ("weight", "bias")})
    for i in range(depth):
        for theirs, mine in _DECODER_BLOCK.items():
            out.update({f"{ours}.blocks.{i}.{mine}.{p}": state[f"{d}_blocks.{i}.{theirs}.{p}"]
                        for p in ("weight", "bias")})
    for p in ("weight", "bias"):
        copies = [state[f"{d}_enc_norm.{j}.{p}"] for j in range(num_taps)]
        if any(not torch.equal(c, copies[0]) for c in copies):
            raise ValueError(f"{d}_enc_norm.*.{p}: the copies differ, expected one LayerNorm shared "
                             f"by the taps")
        if shared_tap_norm:
            out[f"{ours}.tap_norm.{p}"] = copies[0]
        else:
            out.update({f"{ours}.tap_norm.{j}.{p}": c for j, c in enumerate(copies)})
    return out


def encoder_to_timm(state: dict, grid: tuple[int, int] | None = None) -> dict:
    """The encoder of any of: our DiGPT (encoder.*), our SegmentViT, the official pre-training or
    fine-tuning model, a timm ViT -> the state_dict of timm's
    VisionTransformer(class_token=True, global_pool='avg', fc_norm=True, num_classes=<head rows or 0>).

    pos_embed comes out cls first, with a zero cls row where the source has none: with full
    attention the cls token's place in the sequence does not matter, so our encoder (cls last,
    without a position) is the same encoder. Decoder keys are dropped; fc_norm and head are kept
    where the source has them, and a fresh fc_norm (ones, zeros: where fine-tuning starts from)
    is added where it has none. `grid` (rows, cols) of patches is needed only for a non-square grid
    whose pos_embed has no cls row."""
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    else:
        state = {k: v for k, v in state.items() if not _DECODER_KEY.match(k)}
    if any(k.startswith("norm.") for k in state):
        raise ValueError("the source has a final norm over the tokens (norm.*), which a "
                         "global_pool='avg', fc_norm=True ViT has no place for")
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"not a ViT encoder state_dict: no {key!r} among {_short(sorted(state))}")
    out = dict(state)
    out["pos_embed"] = _cls_first(state["pos_embed"], grid)
    width = state["cls_token"].shape[-1]
    for p, init in (("weight", torch.ones), ("bias", torch.zeros)):
        out.setdefault(f"fc_norm.{p}", init(width))
    _check_timm_layout(out, grid)
    return out


def _cls_first(pos_embed: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    rows = pos_embed.shape[1]
    if grid is not None:
        patches = grid[0] * grid[1]
        has_cls = {patches: False, patches + 1: True}.get(rows)
    else:
        has_cls = False if _square_side(rows) else True if _square_side(rows - 1) else None
    if has_cls is None:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not fit the grid {grid or 'square'}"
                         f"{'' if grid else '; pass grid=(rows, cols) for a non-square grid'}")
    return pos_embed if has_cls else torch.cat([torch.zeros_like(pos_embed[:, :1]), pos_embed], dim=1)


def timm_vit_for(state: dict, grid: tuple[int, int] | None = None, **kwargs) -> VisionTransformer:
    """The timm ViT (global_pool='avg', fc_norm=True) whose state_dict has the keys and shapes of
    `state` (an encoder_to_timm output), with randomly initialised weights; `kwargs` override
    settings that leave the state_dict alone (num_heads, norm eps, ...)."""
    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    patches = state["pos_embed"].shape[1] - 1
    gh, gw = grid or (_square_side(patches),) * 2
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * width
    settings = dict(
        img_size=(gh * patch, gw * patch), patch_size=patch, in_chans=channels, embed_dim=width,
        depth=_count(state, "blocks."), num_heads=1, mlp_ratio=hidden / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=True, global_pool="avg",
        fc_norm=True, num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)
    return VisionTransformer(**{**settings, **kwargs})


def _check_timm_layout(state: dict, grid: tuple[int, int] | None):
    """Keys and shapes against timm's own model of those dims (built on the meta device: free)."""
    with torch.device("meta"):
        expected = timm_vit_for(state, grid).state_dict()
    _check_keys(state, set(expected), "a ViT encoder state_dict")
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"not a ViT encoder state_dict: shapes {_short(wrong)}")
