"""The official D-iGPT pre-training checkpoints (OliverRensu/D-iGPT, DiGPT_torch, models_digpt.py)
-> our DiGPT. Pure functions over dicts of tensors.

Layout of theirs: encoder keys as in timm, pos_embed (1, 1+N, C) with a zero cls row first; per
decoder d in (ar, kd): d_enc2dec, d_enc_norm.{0..3} (one LayerNorm listed once per tap),
d_blocks.i.*, d_token, d_norm, d_pred; decoder_pos_embed; buffer mask. Ours: encoder.*
(SegmentViT, pos_embed (1, N, C) without a cls row) and decoders.{ar,kd}.*.
"""
import torch

from ..layers.pos_embed import sincos_2d
from ..state_dicts import check_keys, count_indexed, param_names, square_side

DECODERS = ("ar", "kd")
_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# official DecoderBlock submodule -> ours (digpt_decoder.py)
_DECODER_BLOCK = {
    "norm1": "norm1", "attn1.qkv": "self_attn.qkv", "attn1.proj": "self_attn.proj",
    "norm2_1": "norm2_q", "norm2_2": "norm2_kv", "attn2.q": "cross_attn.q",
    "attn2.kv": "cross_attn.kv", "attn2.proj": "cross_attn.proj", "norm2": "norm3",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
# official per-decoder module -> ours, inside decoders.<d>
_DECODER_MODULES = {"enc2dec": "enc2dec", "norm": "head_norm", "pred": "head"}


def official_pretrain_keys(depth: int, decoder_depth: int, num_taps: int) -> set[str]:
    """Every key of the official DiGPT pre-training state_dict of these depths."""
    keys = {"cls_token", "pos_embed", "decoder_pos_embed", "mask"} | param_names("patch_embed.proj")
    keys |= param_names(*(f"blocks.{i}.{m}" for i in range(depth) for m in _BLOCK))
    for d in DECODERS:
        keys |= {f"{d}_token"} | param_names(*(f"{d}_{m}" for m in _DECODER_MODULES))
        keys |= param_names(*(f"{d}_enc_norm.{j}" for j in range(num_taps)))
        keys |= param_names(*(f"{d}_blocks.{i}.{m}" for i in range(decoder_depth) for m in _DECODER_BLOCK))
    return keys


def digpt_from_official(state: dict, shared_tap_norm: bool = True) -> dict:
    """The official DiGPT pre-training state_dict -> the state_dict of our DiGPT
    (models.create_method("digpt", ...) of the same dims, taps and shared_tap_norm), for a strict load.

    Checked on the way: the copies of each decoder's tap norm are one LayerNorm; the cls row of
    pos_embed is zero (our encoder has none); decoder_pos_embed is MAE's sin-cos, which our
    decoders rebuild as a fixed buffer instead of loading it."""
    depth, decoder_depth = count_indexed(state, "blocks."), count_indexed(state, "ar_blocks.")
    num_taps = count_indexed(state, "ar_enc_norm.")
    check_keys(state, official_pretrain_keys(depth, decoder_depth, max(num_taps, 1)),
                "an official D-iGPT pre-training state_dict")
    out = {f"encoder.{k}": v for k, v in state.items() if k in param_names("patch_embed.proj")
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
    side = square_side(pos_embed.shape[1] - 1)
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
