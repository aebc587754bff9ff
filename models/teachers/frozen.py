"""What every teacher module shares: frozen, always in eval mode, and taking the student's
ImageNet-normalised pixels, which it maps to its own normalisation (x * scale + shift)."""
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn


class FrozenTeacher(nn.Module):
    def freeze(self, own_mean, own_std, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD):
        """No gradients, eval mode, and the pixel mapping from the input normalisation to its own."""
        self.requires_grad_(False)
        mean, std = torch.tensor(input_mean), torch.tensor(input_std)
        own_mean, own_std = torch.tensor(own_mean), torch.tensor(own_std)
        self.register_buffer("scale", (std / own_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - own_mean) / own_std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout, frozen statistics

    def renormalise(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift
