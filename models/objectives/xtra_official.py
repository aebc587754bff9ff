"""The official XTRA checkpoints (elad-amrani/xtra) <-> our XTRA. Pure functions over dicts of tensors.

Theirs: the B/16 Lightning state_dict, no prefix (`enc.*`, `proj.mlp.{0,2}`, `predictor.*`,
`aim_proj.0.mlp.{0,2}`), and the H/14 DeepSpeed mp_rank_00_model_states.pt, whose "module" holds
the same keys (read_state_dict unwraps it; older Lightning adds `_forward_module.`, stripped
there too). Ours: `encoder.*` (SegmentViT with pos_embed="learned", cls_token=False,
final_norm=True), `proj.*`, `predictor.*`, `head.*`. The official loader is strict=False, so a
prefix mismatch there loads nothing in silence; here every expected key must be present.
"""
from ..state_dicts import check_keys, count_indexed, param_names

# official top-level module -> ours
_PARTS = {"enc.": "encoder.", "proj.": "proj.", "predictor.": "predictor.", "aim_proj.0.": "head."}
_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def official_keys(depth: int, predictor_depth: int) -> set[str]:
    """Every key of the official XTRA pre-training state_dict of these depths."""
    keys = {"enc.pos_embed", "predictor.pos_embed"}
    keys |= param_names("enc.patch_embed.proj", "enc.norm", "predictor.norm", "proj.mlp.0",
                        "aim_proj.0.mlp.0", "aim_proj.0.mlp.2") | {"proj.mlp.2.weight"}
    keys |= param_names(*(f"enc.blocks.{i}.{m}" for i in range(depth) for m in _BLOCK))
    keys |= param_names(*(f"predictor.blocks.{i}.{m}" for i in range(predictor_depth) for m in _BLOCK))
    return keys


def xtra_from_official(state: dict) -> dict:
    """The official XTRA state_dict -> the state_dict of our XTRA of the same dims, for a strict load."""
    check_keys(state, official_keys(count_indexed(state, "enc.blocks."), count_indexed(state, "predictor.blocks.")),
               "an official XTRA pre-training state_dict")
    return {_rename(k, _PARTS): v for k, v in state.items()}


def xtra_to_official(state: dict) -> dict:
    """Our XTRA's state_dict -> the official layout (what its own loader reads)."""
    out = {_rename(k, {ours: theirs for theirs, ours in _PARTS.items()}): v for k, v in state.items()}
    check_keys(out, official_keys(count_indexed(out, "enc.blocks."), count_indexed(out, "predictor.blocks.")),
               "an XTRA with the official encoder flavour (backbone.cls_token=false, final_norm=true, "
               "pos_embed=learned)")
    return out


def _rename(key: str, parts: dict) -> str:
    for old, new in parts.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise ValueError(f"{key}: not a key of any XTRA part ({', '.join(parts)})")
