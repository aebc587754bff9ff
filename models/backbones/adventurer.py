"""Adventurer (arXiv 2410.07599, wangf3014/Adventurer): a causal image model in linear time. Each
block is a Mamba-2 scan over the patch tokens and a cls token appended LAST (so cls reads the
whole image), with a "heading average" token (the mean of all tokens) prepended so that early
tokens see a summary too, and a SwiGLU MLP; alternate layers reverse the patch order.

One module is both the classifier (timm-style, the official forward) and the student
(forward_taps). The student is a causal scan over the tokens in the order it is given, cls last:
the flip and the heading average would show every token the whole image, so it runs without
them (the classifier built from its weights has both: they have no parameters).

Parameter names are the official ones but for the final norm (`norm_f` there, `norm` here, the
name objectives read); adventurer_official.py maps the released checkpoints."""
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from torch import nn

from ..layers.mamba2 import KERNELS, Mamba2, check_kernels
from ..layers.taps import gather_tokens
from ..registry import BACKBONES, Backbone
from ..state_dicts import square_side
from .adventurer_official import adventurer_from_official, is_official

# (width, depth) of the official sizes
ADVENTURER_SIZES = {"tiny": (256, 12), "small": (512, 12), "base": (768, 12), "large": (1024, 24)}
# which layers n (0-based) reverse the patch order: the released code flips when n // 2 == 1
# (layers 2 and 3 only), which its author called a bug (issue #6; the intent: every other layer)
FLIPS = {"official": lambda n: n // 2 == 1, "alternate": lambda n: n % 2 == 1, "none": lambda n: False}


@dataclass
class AdventurerConfig:
    name: str = "adventurer"
    size: str = "base"  # tiny 256 / 12, small 512 / 12, base 768 / 12, large 1024 / 24 (width / depth)
    image_size: int = 224
    patch_size: int = 16  # the released models: 16, and base at 8
    width: Optional[int] = None  # override the size's width / depth
    depth: Optional[int] = None
    d_state: int = 64  # the Mamba-2 mixer's (mamba_ssm's Mamba2 defaults but d_state)
    headdim: int = 64
    expand: int = 2
    chunk_size: int = 256  # SSD chunk: 256 covers a 224/16 sequence (198 tokens) in one
    drop_path: float = 0.1
    # layers that reverse the patch order: official (the released code: n // 2 == 1, layers 2 and
    # 3), alternate (every other layer, the intent), none
    flip: str = "official"
    kernels: str = "pure"  # pure (plain PyTorch, any device) | mamba_ssm (its Triton scan, CUDA only)
    # loading weights of another resolution (the stage transitions): false resamples the patch grid
    # and keeps the cls position (ours); true reproduces the official main.py, which takes the
    # first row (patch (0, 0)'s position) as cls and resamples the other rows, the cls row among
    # them, as the grid: for matching the released checkpoints' lineage exactly
    official_stage_resample: bool = False
    CHOICES: ClassVar[dict] = {"size": tuple(ADVENTURER_SIZES), "flip": tuple(FLIPS), "kernels": KERNELS}
    BOUNDS: ClassVar[dict] = {"image_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "depth": ">= 1",
                              "d_state": ">= 1", "headdim": ">= 1", "expand": ">= 1", "chunk_size": ">= 1",
                              "drop_path": "[0, 1)"}


def adventurer_dims(cfg: AdventurerConfig) -> tuple[int, int]:
    w, d = ADVENTURER_SIZES[cfg.size]
    return cfg.width or w, cfg.depth or d


def mixer_kwargs(cfg: AdventurerConfig) -> dict:
    """The settings of each block's Mamba2 mixer."""
    return dict(d_state=cfg.d_state, headdim=cfg.headdim, expand=cfg.expand, chunk_size=cfg.chunk_size,
                kernels=cfg.kernels)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all with bias (the official MLP, hidden 2.5 x width)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def flip_patches(x: torch.Tensor) -> torch.Tensor:
    """The patch tokens in reverse order, the last (cls) token kept last."""
    return torch.cat([x[:, :-1].flip(1), x[:, -1:]], dim=1)


class AdventurerBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float, **mixer):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = Mamba2(dim, **mixer)
        self.norm_mlp = nn.RMSNorm(dim, eps=1e-5)
        self.mlp = SwiGLU(dim, int(dim * 2.5))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, flip: bool = False, heading: bool = True) -> torch.Tensor:
        """x (B, N + 1, C), cls last. flip: the mixer reads the patches in reverse order (its
        output is put back in order); heading: the mean of the normalised tokens goes first
        through the mixer and is dropped after it."""
        h = self.norm(x)
        h = flip_patches(h) if flip else h
        if heading:
            h = self.mixer(torch.cat([h.mean(1, keepdim=True), h], dim=1))[:, 1:]
        else:
            h = self.mixer(h)
        h = flip_patches(h) if flip else h
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))


class Adventurer(nn.Module):
    extra_tokens = 1  # cls, after the patches (the official place: a causal scan reads it last)
    causal_only = True  # the student is a causal scan: objectives give it tokens in causal order, no mask

    def __init__(self, cfg: AdventurerConfig, num_classes: int = 0):
        super().__init__()
        width, depth = adventurer_dims(cfg)
        # adapt_state: resample another resolution's positions as the official stage transition does
        self.official_stage_resample = cfg.official_stage_resample
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, width, bias=True)
        self.grid, self.patch_size = tuple(self.patch_embed.grid_size), tuple(self.patch_embed.patch_size)
        self.embed_dim = self.num_features = width
        self.num_classes = num_classes
        self.flips = [FLIPS[cfg.flip](n) for n in range(depth)]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, width))  # cls row last
        rates = [0.0] + torch.linspace(0, cfg.drop_path, depth, device="cpu").tolist()  # the official rule: layer n gets rates[n]
        self.layers = nn.ModuleList(AdventurerBlock(width, rates[n], **mixer_kwargs(cfg)) for n in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """The official: every Linear bias zero, out_proj kaiming-uniform / sqrt(depth), the other
        Linear and mixer weights PyTorch's / Mamba2's own, a lecun-normal patch conv, the head,
        positions and cls ~ trunc-normal(0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for layer in self.layers:
            with torch.no_grad():
                nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=5 ** 0.5).div_(self.depth ** 0.5)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def blocks(self) -> nn.ModuleList:  # the name probes and the trainer look for
        return self.layers

    def with_cls(self, patches: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, -1:]).expand(patches.shape[0], -1, -1)
        return torch.cat([patches, cls], dim=1)

    # --- the student ---
    def forward_taps(self, images, token_index, attn_mask, taps):
        """The patches `token_index` (B, M) in that order, cls last, through a causal scan (no
        flip, no heading average): token i sees tokens 0..i. attn_mask is not read: the scan is
        causal whatever it is (the backbone declares masks = ("causal",))."""
        x = self.with_cls(gather_tokens(self.patch_embed(images) + self.pos_embed[:, :-1], token_index))
        outs = []
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, flip=False, heading=False)
            if i in taps:
                outs.append(x)
        return outs

    # --- the classifier ---
    def run_layers(self, images: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last layer's tokens (patches, then cls) and those of the last `keep` layers."""
        x = self.with_cls(self.patch_embed(images) + self.pos_embed[:, :-1])
        kept = []
        for n, layer in enumerate(self.layers):
            x = layer(x, flip=self.flips[n])
            if n >= self.depth - keep:
                kept.append(x)
        return x, kept

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.run_layers(images)[0])

    def forward_intermediates(self, images: torch.Tensor, indices: int = 1, norm: bool = False,
                              output_fmt: str = "NLC", intermediates_only: bool = True) -> list[torch.Tensor]:
        """The patch tokens (B, N, C) after each of the last `indices` layers, cls left out (the
        NLC / intermediates-only form of timm's interface the probes use)."""
        if output_fmt != "NLC" or not intermediates_only:
            raise ValueError("Adventurer.forward_intermediates gives NLC intermediates only")
        return [(self.norm(x) if norm else x)[:, :-1] for x in self.run_layers(images, indices)[1]]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, -1]  # cls, last
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """The official's (besides biases and 1-D parameters: norms, dt_bias, A_log, D)."""
        return {"cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^layers\.(\d+)", None), (r"^norm", (99999,))]}


@BACKBONES.register("adventurer")
class AdventurerBackbone(Backbone):
    Config = AdventurerConfig
    masks = ("causal",)  # a causal scan: no mask makes it see a later token, none hides an earlier one
    blocks = (AdventurerBlock,)

    @staticmethod
    def check(cfg: AdventurerConfig):
        Backbone.check(cfg)
        width, _ = adventurer_dims(cfg)
        if (cfg.expand * width) % cfg.headdim:
            raise ValueError(f"backbone.headdim {cfg.headdim} does not divide the mixer's inner width "
                             f"{cfg.expand * width} (backbone.expand x width); pick a divisor, e.g. 64")
        check_kernels(cfg.kernels)

    @staticmethod
    def student(cfg: AdventurerConfig) -> Adventurer:
        return Adventurer(cfg)

    @staticmethod
    def classifier(cfg: AdventurerConfig, num_classes: int = 0) -> Adventurer:
        return Adventurer(cfg, num_classes)

    @staticmethod
    def import_state(state: dict) -> dict:
        """Ours (a pre-training checkpoint's encoder.*, a classifier) or an official checkpoint."""
        return adventurer_from_official(state) if is_official(state) else Backbone.import_state(state)

    @staticmethod
    def adapt_state(state: dict, classifier: Adventurer) -> dict:
        """Another resolution (the stage transitions: 128 -> 224 px): the position grid resampled
        bicubically as the official code does (timm's resample, no antialias), the cls position
        kept LAST, where this model reads it. (The official transition takes the first row as
        cls, so it resamples the grid shifted by one with the cls row inside it; with
        backbone.official_stage_resample=true this does the same: row 0 stays row 0, rows 1..N
        (patches 1..N-1, then cls) are read as the old grid in raster order and resampled to the
        new one, whose last entry becomes the cls row.)"""
        state = dict(state)
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and kernel.shape != classifier.patch_embed.proj.weight.shape:
            raise ValueError(f"the checkpoint's patch kernel {tuple(kernel.shape)} does not fit backbone.patch_size "
                             f"{classifier.patch_size[0]}; set backbone.patch_size to the checkpoint's")
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != classifier.pos_embed.shape:
            old = square_side(pos.shape[1] - 1)
            official = getattr(classifier, "official_stage_resample", False)
            first, rows = (pos[:, :1], pos[:, 1:]) if official else (None, pos[:, :-1])
            grid = resample_abs_pos_embed(rows.float(), list(classifier.grid), [old, old],
                                          num_prefix_tokens=0, interpolation="bicubic", antialias=False)
            grid = grid.to(pos.dtype)
            state["pos_embed"] = torch.cat([first, grid] if official else [grid, pos[:, -1:]], dim=1)
        return state
