"""A Mamba-2 mixer (Dao & Gu, arXiv 2405.21060) in plain PyTorch: static shapes, no custom kernels,
so torch_xla.compile compiles it once and it runs on a TPU, a GPU or a CPU alike. Parameter names
are mamba_ssm's `Mamba2`, so its weights load as they are.

The scan is the chunked SSD algorithm (the paper's "minimal SSD"): inside a chunk the output is a
masked matmul (weighted by the decays between steps); across chunks a state per chunk is carried by a
second, small masked matmul. Its cost is linear in the sequence length (quadratic only in the
chunk length). The sequence is padded at its end to a chunk multiple: a causal scan never lets a
padded step reach an earlier output.

Under bf16 autocast the numerically sensitive parts run in float32: dt and its softplus, the
decays and their cumulative sums, exp, the states, the gated RMSNorm."""
import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: mamba_ssm's fused Triton kernel, on a CUDA device only (backbone.kernels=mamba_ssm)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None

KERNELS = ("pure", "mamba_ssm")


def check_kernels(kernels: str):
    """ValueError for a scan implementation that cannot run here."""
    if kernels not in KERNELS:
        raise ValueError(f"backbone.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "mamba_ssm" and mamba_chunk_scan_combined is None:
        raise ValueError("backbone.kernels=mamba_ssm needs the mamba_ssm package (and a CUDA GPU); "
                         "backbone.kernels=pure runs anywhere")


def segment_sum(a_cum: torch.Tensor) -> torch.Tensor:
    """(..., T) cumulative sums of log decays -> (..., T, T): out[i, j] = a_cum[i] - a_cum[j] =
    a[j+1] + ... + a[i] for j <= i, -inf above the diagonal (exp of it is the decay from step j
    to step i, 0 where j is in i's future). Differences in float32, as mamba_ssm's kernels take
    them: the minimal SSD's cumulative sum over a (T, T) repeat costs T^3 on XLA, whose cumsum
    is a reduce-window."""
    T = a_cum.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=a_cum.device).tril()
    return (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk: int) -> torch.Tensor:
    """y_t = C_t S_t with S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, S_0 = 0, per head; in float32.

    x (b, l, h, p); dt (b, l, h) after softplus; A (h,) negative; B, C (b, l, g, n), g groups of
    h / g heads each. Chunks of min(chunk, l) steps."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    T = min(chunk, l)
    pad = -l % T
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // T
    a = (dt * A.float()).reshape(b, c, T, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, T): log decays
    xdt = (x * dt[..., None]).reshape(b, c, T, g, r, p)
    B, C = B.reshape(b, c, T, g, n), C.reshape(b, c, T, g, n)
    a_cum = a.cumsum(-1)

    # 1. inside each chunk: (C_i . B_j) exp(sum a_{j+1..i}) x_j dt_j for j <= i
    scores = torch.einsum("bcign,bcjgn->bgcij", C, B)[:, :, None] * torch.exp(segment_sum(a_cum))
    y = torch.einsum("bgrcij,bcjgrp->bcigrp", scores, xdt)
    # 2. the state each chunk leaves, from its own steps
    to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 3, 4, 1, 2)  # (b, c, T, g, r)
    states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, xdt * to_end[..., None])
    # 3. the state entering each chunk: the earlier chunks' states, decayed across chunks
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    across = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0)).cumsum(-1)))  # (b, g, r, c + 1, c + 1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", across, states)[:, :-1]
    # 4. what the entering state gives each step of the chunk
    from_start = torch.exp(a_cum).permute(0, 3, 4, 1, 2)  # (b, c, T, g, r)
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", C, states) * from_start[..., None]
    return y.reshape(b, c * T, h, p)[:, :l]


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) through a causal depthwise conv, weight (C, 1, K): out_t = bias + sum_k w_k x_{t-K+1+k},
    as K shifted multiplies. The same as Conv1d(groups=C, padding=K-1) cut back to L; XLA lowers a
    grouped conv of thousands of groups slowly (the Base mixer ran 3.5x slower with it on XLA:CPU)."""
    K, L = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, K - 1, 0))
    return sum(padded[:, k:k + L] * weight[:, 0, k] for k in range(K)) + bias


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight over groups of the width (mamba_ssm's RMSNormGated with
    norm_before_gate=False), in float32."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            h = (y.float() * F.silu(z.float())).unflatten(-1, (self.groups, -1))
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return h.flatten(-2) * self.weight.float()


class Mamba2(nn.Module):
    """mamba_ssm's Mamba2 mixer (no in/out-projection bias, conv bias, gated RMSNorm, D per head):
    in_proj -> z | xBC | dt; xBC through a causal depthwise conv and SiLU -> x | B | C;
    dt = softplus(dt + dt_bias); A = -exp(A_log); y = SSD(x, dt, A, B, C) + D x;
    out_proj(RMSNorm(y * silu(z)))."""

    # d_state, expand, headdim, chunk_size and kernels have no defaults: a backbone's config holds them
    def __init__(self, d_model: int, *, d_state: int, expand: int, headdim: int, chunk_size: int, kernels: str,
                 d_conv: int = 4, ngroups: int = 1, A_init_range=(1, 16), dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"the mixer's inner width {self.d_inner} (expand x width) is not a multiple of "
                             f"its head width {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{ngroups} B/C groups do not divide the mixer's {self.nheads} heads")
        check_kernels(kernels)
        self.d_state, self.headdim, self.ngroups, self.chunk_size, self.kernels = (
            d_state, headdim, ngroups, chunk_size, kernels)
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=False)  # z | xBC | dt
        # mamba_ssm's parameters (and init); applied by causal_depthwise_conv, not Conv1d.forward
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        # mamba_ssm's inits: dt log-uniform in [dt_min, dt_max] (floored), stored as softplus^-1;
        # A uniform in A_init_range, stored as its log; D = 1
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model); output t depends on inputs 0..t only."""
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        xBC = F.silu(causal_depthwise_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))
        with torch.autocast(u.device.type, enabled=False):
            A = -torch.exp(self.A_log.float())
            if self.kernels == "mamba_ssm" and u.is_cuda:  # fuses softplus(dt + dt_bias) and the D skip
                y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D,
                                              dt_bias=self.dt_bias, dt_softplus=True).float()
            else:
                dt = F.softplus(dt.float() + self.dt_bias.float())
                y = ssd_scan(x, dt, A, B, C, self.chunk_size) + self.D.float()[:, None] * x.float()
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.to(self.out_proj.weight.dtype))  # under autocast, bf16 as any Linear
