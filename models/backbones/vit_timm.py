"""A ViT encoder from any of our pre-training objectives (encoder.*), our SegmentViT, the official
D-iGPT pre-training or fine-tuning models, the official XTRA pre-training models (enc.*), the
official SAIM pre-training models (separate q / k / v, a query stream beside), or a timm ViT -> the state_dict of timm's VisionTransformer(global_pool='avg'): the layout the ViT classifier
loads and export-timm writes. With a cls token it comes first; without a final norm the layout
has fc_norm after the pool (MAE / D-iGPT), with one it keeps `norm` before the pool (XTRA). Pure
functions over dicts of tensors; reading and writing files is xla_trainer/pretrained.py's job."""
import re

import torch
from timm.models.vision_transformer import VisionTransformer

from ..state_dicts import check_keys, count_indexed, fuse_qkv, short_list, square_side

# the keys of a timm ViT encoder; pre-training checkpoints hold others (decoders, masks)
_VIT_KEY = re.compile(r"^(cls_token|pos_embed|reg_token|patch_embed\.|blocks\.|norm\.|fc_norm\.|head\.)")


# where an encoder sits in the checkpoints of a whole pre-training model: ours, the official XTRA's
ENCODER_PREFIXES = ("encoder.", "enc.")
# a whole model with a query stream beside its encoder (SAIM's: the official one's encoder at the
# top level, ours under encoder.*): its top-level `norm` is the query stream's head norm, not the
# encoder's. The official fine-tuning and linear probe with the cls token (global_pool off) load it
# as the classifier's final norm, applied to the cls token: here fc_norm (after a cls pool, the same).
QUERY_STREAM = "query_blocks."


def encoder_to_timm(state: dict, grid: tuple[int, int] | None = None) -> dict:
    """The encoder of any of: our pre-training objectives (encoder.*), our SegmentViT, the official
    D-iGPT pre-training or fine-tuning model, the official XTRA model (enc.*), the official SAIM
    model, a timm ViT -> the
    state_dict of timm's VisionTransformer(global_pool='avg', class_token=<has one>,
    fc_norm=<has no final norm>, num_classes=<head rows or 0>).

    A cls token's pos_embed row comes out first, zero where the source has none: with full
    attention the cls token's place in the sequence does not matter, so our encoder (cls last,
    without a position) is the same encoder. Other keys (decoders, predictors) are dropped; a
    source without a final norm gets a fresh fc_norm (ones, zeros: where fine-tuning starts from)
    where it has none. `grid` (rows, cols) of patches is needed only for a non-square grid whose
    pos_embed has no cls row.

    A SAIM model (a query stream beside the encoder) carries its trained head norm into fc_norm
    instead: where the official cls-token fine-tuning and probe start from (they load it as the
    classifier's `norm`, then read cls). With backbone.pool=token (SAIM's recipe configs) this is
    exact; the official global-pool fine-tuning would start fc_norm fresh instead."""
    beside_query_stream = any(k.startswith(QUERY_STREAM) for k in state)
    head_norm = {k: v for k, v in state.items() if beside_query_stream and k in ("norm.weight", "norm.bias")}
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        state = {k: v for k, v in state.items()
                 if _VIT_KEY.match(k) and not (beside_query_stream and k.startswith("norm."))}
    state = fuse_qkv(state, "blocks.")  # encoders with separate q / k / v projections (SAIM's)
    if any(k.startswith("norm.") for k in state) and any(k.startswith("fc_norm.") for k in state):
        raise ValueError("the source has both a final norm over the tokens (norm.*) and fc_norm.*, "
                         "which a global_pool='avg' ViT has no place for")
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"not a ViT encoder state_dict: no {key!r} among {short_list(sorted(state))}")
    out = dict(state)
    if "cls_token" in state:
        out["pos_embed"] = _cls_first(state["pos_embed"], grid)
    if "norm.weight" not in state:
        width = state["pos_embed"].shape[-1]
        for p, init in (("weight", torch.ones), ("bias", torch.zeros)):
            out.setdefault(f"fc_norm.{p}", head_norm.get(f"norm.{p}", init(width)))
    _check_timm_layout(out, grid)
    return out


def _cls_first(pos_embed: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    rows = pos_embed.shape[1]
    if grid is not None:
        patches = grid[0] * grid[1]
        has_cls = {patches: False, patches + 1: True}.get(rows)
    else:
        has_cls = False if square_side(rows) else True if square_side(rows - 1) else None
    if has_cls is None:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not fit the grid {grid or 'square'}"
                         f"{'' if grid else '; pass grid=(rows, cols) for a non-square grid'}")
    return pos_embed if has_cls else torch.cat([torch.zeros_like(pos_embed[:, :1]), pos_embed], dim=1)


def timm_vit_for(state: dict, grid: tuple[int, int] | None = None, **kwargs) -> VisionTransformer:
    """The timm ViT (global_pool='avg') whose state_dict has the keys and shapes of `state` (an
    encoder_to_timm output), with randomly initialised weights; `kwargs` override settings that
    leave the state_dict alone (num_heads, norm eps, ...)."""
    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    cls_token = "cls_token" in state
    patches = state["pos_embed"].shape[1] - cls_token
    gh, gw = grid or (square_side(patches),) * 2
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * width
    settings = dict(
        img_size=(gh * patch, gw * patch), patch_size=patch, in_chans=channels, embed_dim=width,
        depth=count_indexed(state, "blocks."), num_heads=1, mlp_ratio=hidden / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=cls_token, global_pool="avg",
        fc_norm="norm.weight" not in state, num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)
    return VisionTransformer(**{**settings, **kwargs})


def _check_timm_layout(state: dict, grid: tuple[int, int] | None):
    """Keys and shapes against timm's own model of those dims (built on the meta device: free)."""
    with torch.device("meta"):
        expected = timm_vit_for(state, grid).state_dict()
    check_keys(state, set(expected), "a ViT encoder state_dict")
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"not a ViT encoder state_dict: shapes {short_list(wrong)}")
