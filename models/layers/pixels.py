"""Pixel targets of the pixel-predicting objectives (XTRA, SAIM)."""
import torch
import torch.nn.functional as F


def normalise_pixels(pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row (a patch's or a block's pixels) to zero mean and unit (unbiased) variance, in
    float32: MAE's norm_pix_loss, which XTRA and SAIM use."""
    pixels = pixels.float()
    mean, var = pixels.mean(-1, keepdim=True), pixels.var(-1, keepdim=True)
    return (pixels - mean) / (var + eps).sqrt()


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C): each patch's pixels channel-fastest, (y, x, c) order
    (MAE's), patches in raster order."""
    (ph, pw), (H, W) = patch, images.shape[-2:]
    x = images.unflatten(2, (H // ph, ph)).unflatten(4, (W // pw, pw))  # B C gh ph gw pw
    return x.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """(size, size) 2-D Gaussian centred on the middle pixel, summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).float()


def gaussian_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with `kernel` (k, k), zero padded to the same size (SAIM's target:
    not torchvision's gaussian_blur, which pads by reflection)."""
    channels = images.shape[1]
    weight = kernel.to(images.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(images, weight, padding="same", groups=channels)  # odd kernels: k // 2 zeros a side

