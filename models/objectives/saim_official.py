"""The official SAIM checkpoints (qiy20/SAIM) <-> our SAIM. Pure functions over dicts of tensors.

Theirs ({'model', 'optimizer', 'epoch', 'scaler', 'args'}; read_state_dict takes "model"): the
content stream at the top level (`cls_token`, `pos_embed` (1, 1 + N, C) with a zero cls row,
`patch_embed.proj`, `blocks.i` with separate `attn.{q,k,v}`), `query_blocks.i` (the same block),
`norm` and `prediction_head.fc{1,2}` (the query stream's head), `gaussian_blur.weight` (a buffer).
Ours: `encoder.*` (SegmentViT: fused `attn.qkv`, pos_embed (1, N, C)), `query_blocks.*` (already
the official block's names), `norm.*`, `prediction_head.*`."""
from ..layers.pixels import gaussian_kernel
from ..state_dicts import check_keys, count_indexed, fuse_qkv, param_names, split_qkv

_CONTENT_BLOCK = ("norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
BLUR = "gaussian_blur.weight"


def official_keys(depth: int, query_depth: int) -> set[str]:
    """Every key of the official SAIM pre-training state_dict of these depths."""
    keys = {"cls_token", "pos_embed", BLUR}
    keys |= param_names("patch_embed.proj", "norm", "prediction_head.fc1", "prediction_head.fc2")
    keys |= param_names(*(f"{part}.{i}.{m}" for part, n in (("blocks", depth), ("query_blocks", query_depth))
                          for i in range(n) for m in _CONTENT_BLOCK))
    return keys


def is_official(state: dict) -> bool:
    """A whole official SAIM model: its query stream beside an encoder with separate q / k / v."""
    return any(k.startswith("query_blocks.") for k in state) and "blocks.0.attn.q.weight" in state


def _check(state: dict, what: str):
    check_keys(state, official_keys(count_indexed(state, "blocks."), count_indexed(state, "query_blocks.")), what)


def saim_from_official(state: dict) -> dict:
    """The official SAIM state_dict -> the state_dict of our SAIM of the same dims, strict."""
    _check(state, "an official SAIM pre-training state_dict")
    out = fuse_qkv({k: v for k, v in state.items() if k != BLUR}, "blocks.")
    out["pos_embed"] = out["pos_embed"][:, 1:]  # ours has no cls row: cls has no position
    return {("encoder." + k if k.startswith(_ENCODER) else k): v for k, v in out.items()}


def saim_to_official(state: dict, blur_kernel: int = 9, blur_sigma: float = 1.0) -> dict:
    """Our SAIM's state_dict -> the official layout (its own loader reads it strictly)."""
    out = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
    out = split_qkv(out, "blocks.")
    pos = out["pos_embed"]
    out["pos_embed"] = pos.new_zeros(1, 1 + pos.shape[1], pos.shape[2])
    out["pos_embed"][:, 1:] = pos
    out[BLUR] = gaussian_kernel(blur_kernel, blur_sigma).expand(3, 1, blur_kernel, blur_kernel).clone()
    _check(out, "a SAIM with the official content stream (backbone.name=vit, cls_token=true)")
    return out
