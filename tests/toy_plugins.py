"""A toy objective and a toy backbone, registered from outside the project's packages (the tests
set XLA_TRAINER_PLUGINS=toy_plugins): the trainer-generic tests run on them, and they prove that a
system is new files plus configs.

toy objective: encode a random `keep` fraction of the patches (the noise picks which) and regress
each encoded patch's mean colour. No teacher; any mask-taking backbone.
toy backbone: patch embedding, learned positions, blocks that mix tokens by a masked mean (any
boolean mask) then apply an MLP; a timm-style classifier over the mean token."""
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

from xla_trainer_models.layers.taps import block_outputs, gather_tokens
from xla_trainer_models.registry import BACKBONES, MASKS, OBJECTIVES, Backbone, Objective


@dataclass
class ToyBackboneConfig:
    name: str = "toy"
    image_size: int = 32
    patch_size: int = 8
    width: int = 32
    depth: int = 2
    drop_path: float = 0.0  # unused: the classifier config sections share the key


class MixerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if attn_mask is None:
            mixed = h.mean(1, keepdim=True).expand_as(h)
        else:
            weights = attn_mask.to(h.dtype)
            weights = weights[:, 0] if weights.dim() == 4 else weights  # per sample: (B, 1, L, L)
            mixed = (weights / weights.sum(-1, keepdim=True)) @ h
        x = x + self.mix(mixed)
        return x + self.mlp(self.norm2(x))


class ToyNet(nn.Module):
    """Student (forward_taps, cls last) and timm-style classifier (mean of the tokens, head)."""
    extra_tokens = 1

    def __init__(self, cfg: ToyBackboneConfig, num_classes: int = 0):
        super().__init__()
        width, patch_size = cfg.width, cfg.patch_size
        self.grid = (cfg.image_size // patch_size,) * 2
        self.patch_size = (patch_size, patch_size)
        self.embed_dim = self.num_features = width
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, self.grid[0] * self.grid[1], width), std=0.02))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(MixerBlock(width) for _ in range(cfg.depth))
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed

    def forward_taps(self, images, token_index, attn_mask, taps):
        x = gather_tokens(self.embed(images), token_index)
        return block_outputs(self.blocks, torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1),
                             attn_mask, taps)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^(?:patch_embed|pos_embed|cls_token)", "blocks": r"^blocks\.(\d+)"}


@BACKBONES.register("toy")
class ToyBackbone(Backbone):
    Config = ToyBackboneConfig
    masks = MASKS
    blocks = (MixerBlock,)

    @staticmethod
    def student(cfg):
        return ToyNet(cfg)

    @staticmethod
    def classifier(cfg, num_classes: int = 0):
        return ToyNet(cfg, num_classes)


@dataclass
class ToyConfig:
    name: str = "toy"
    keep: float = 0.5  # fraction of the patches encoded
    # fault injection: the loss of this forward call (1-based, over the whole run, resumes
    # included: the count is a buffer, saved in the checkpoints) is NaN
    nan_at_forward: Optional[int] = None
    # eager backends: sleep this long in each forward, so that a run is still training when a second
    # launch meets its run lock (tests/test_run_lock.py), however fast the machine
    seconds_per_step: float = 0.0


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig, encoder: nn.Module):
        super().__init__()
        self.nan_at_forward, self.seconds_per_step = cfg.nan_at_forward, cfg.seconds_per_step
        if cfg.nan_at_forward is not None:
            self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.encoder = encoder
        tokens = encoder.grid[0] * encoder.grid[1]
        self.keep = max(1, round(tokens * cfg.keep))
        self.noise_shape = (tokens,)
        self.head = nn.Linear(encoder.embed_dim, 3)

    def forward(self, batch: dict, noise: torch.Tensor) -> dict:
        if self.seconds_per_step:  # (dynamo, runtime.dynamo_step, cannot trace a sleep)
            time.sleep(self.seconds_per_step)
        images = batch["images"]
        visible = noise.argsort(dim=-1)[:, :self.keep]
        x = self.encoder.forward_taps(images, visible, None, (self.encoder.depth,))[-1][:, :self.keep]
        colours = F.adaptive_avg_pool2d(images, self.encoder.grid).flatten(2).transpose(1, 2)
        target = torch.gather(colours, 1, visible[..., None].expand(-1, -1, 3))
        loss = F.mse_loss(self.head(x).float(), target.float())
        if self.nan_at_forward is not None:
            self.forwards += 1
            loss = torch.where(self.forwards == self.nan_at_forward, float("nan"), loss)
        return {"loss": loss}


@OBJECTIVES.register("toy")
class ToyObjective(Objective):
    Config = ToyConfig
    mask = "full"

    @staticmethod
    def check(cfg, grid):
        if not 0 < cfg.keep <= 1:
            raise ValueError(f"objective.keep must lie in (0, 1], got {cfg.keep}")

    @staticmethod
    def build(cfg, student, targets):
        return Toy(cfg, student)
