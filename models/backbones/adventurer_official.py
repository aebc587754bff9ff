"""The official Adventurer checkpoints (wangf3014/Adventurer: `checkpoint['model']`, which
xla_trainer.pretrained unwraps) <-> our Adventurer. Pure functions over dicts of tensors.

Theirs: patch_embed.proj, cls_token, pos_embed (cls row LAST, as ours), layers.{i}.norm,
layers.{i}.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight,
out_proj.weight} (mamba_ssm's Mamba2 names), layers.{i}.norm_mlp, layers.{i}.mlp.w{1,2,3}, norm_f,
head. Ours differ only in the final norm: `norm`."""
from ..state_dicts import check_keys, count_indexed

MIXER = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
LAYER = (*(f"mixer.{k}" for k in MIXER), "norm.weight", "norm_mlp.weight",
         *(f"mlp.w{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")))


def is_official(state: dict) -> bool:
    return "norm_f.weight" in state and any(k.startswith("layers.") for k in state)


def official_keys(depth: int, head: bool = True) -> set[str]:
    """Every key of an official checkpoint's model of this depth (with or without a head)."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight"}
    keys |= {f"layers.{i}.{k}" for i in range(depth) for k in LAYER}
    return keys | ({"head.weight", "head.bias"} if head else set())


def adventurer_from_official(state: dict) -> dict:
    """An official checkpoint's model -> ours, every key checked (a file of another layout is an
    error listing what is missing and unexpected, not a silent partial load)."""
    check_keys(state, official_keys(count_indexed(state, "layers."), "head.weight" in state),
               "an official Adventurer checkpoint")
    return {("norm.weight" if k == "norm_f.weight" else k): v for k, v in state.items()}


def adventurer_to_official(state: dict) -> dict:
    """Ours -> the official layout (what its main.py loads under 'model')."""
    return {("norm_f.weight" if k == "norm.weight" else k): v for k, v in state.items()}
