"""The cost of Adventurer's token mixer against sequence length: one Mamba-2 mixer of the Base
config (width 768, d_state 64, 24 heads, chunk 256) beside one multi-head self-attention of a
ViT-B (12 heads, SDPA), forward + backward on a fixed batch, at each length.

    python -m xla_trainer.bench_scan [--tokens 196 784 3136] [--batch 2] [--steps 3] [--backend cpu|xla]

(`xla-trainer bench` times whole train steps of a config; this times the one layer whose cost
in length is the point of the backbone.) One JSON row per length and layer."""
import argparse
import json
import time

import torch
from torch import nn


class Attention(nn.Module):
    """A ViT-B attention layer: qkv, SDPA, projection."""

    def __init__(self, dim: int = 768, heads: int = 12):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def time_layer(layer: nn.Module, tokens: int, batch: int, steps: int, runtime) -> float:
    """ms per forward + backward of `layer` on (batch, tokens, 768), after one warm-up step."""
    x = torch.randn(batch, tokens, 768, device=runtime.device, requires_grad=True)

    def step(x):
        with runtime.autocast():
            loss = layer(x).float().square().mean()
        loss.backward()
        return loss.detach()

    fn = runtime.compile_fn(step, f"scan_{tokens}")
    float(fn(x))  # warm-up (compiles on XLA)
    start = time.perf_counter()
    for _ in range(steps):
        loss = fn(x)
    float(loss)
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None):
    from xla_trainer_models.backbones.adventurer import AdventurerConfig, mixer_kwargs
    from xla_trainer_models.layers.mamba2 import Mamba2
    from .runtime import create_runtime
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 784, 3136])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", choices=("cpu", "xla"), default="cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")
    args = parser.parse_args(argv)
    runtime = create_runtime(args.backend, args.precision)
    torch.manual_seed(0)
    mixer = Mamba2(768, **mixer_kwargs(AdventurerConfig()))  # the Base config's
    layers = {"mamba2": mixer.to(runtime.device), "attention": Attention().to(runtime.device)}
    for tokens in args.tokens:
        for name, layer in layers.items():
            ms = time_layer(layer, tokens, args.batch, args.steps, runtime)
            print(json.dumps({"layer": name, "tokens": tokens, "batch": args.batch, "ms_fwd_bwd": round(ms, 1),
                              "device": runtime.device_kind()}), flush=True)


if __name__ == "__main__":
    main()
