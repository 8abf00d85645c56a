"""A small vision Mamba for CIFAR-sized images, in plain PyTorch.

Patch embedding -> a stack of residual selective state-space (S6) blocks -> mean-pooled
tokens -> linear head. The S6 layer is Mamba's: the step size delta, the input matrix B and
the output matrix C depend on the input token; A is a learned diagonal (negative) matrix.
Each block scans the patch sequence in both directions (as Vision Mamba does; an image has
no causal order), with separate SSM parameters per direction.

The recurrence, per channel d and state n (ZOH for A, Euler for B, as in Mamba):

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t,     y_t = <C_t, h_t> + D x_t

Two PyTorch references compute it: `selective_scan_sequential`, one step at a time
(vectorised over batch, channels and states; the faster one on CPU for patch sequences of
16-64 tokens: 3x the parallel one, measured), and `selective_scan_parallel`, a log-depth
Hillis-Steele scan over the pairs (decay, input) (no division, so no overflow), used on
CUDA. Tests hold both to a scalar per-element loop. On CUDA, when the `mamba_ssm` package is
installed and importable, its fused kernel computes the same function (same argument
layout) and is used instead; nothing requires it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional CUDA kernel; the reference below is the contract
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fused_scan
except Exception:  # noqa: BLE001 - not installed, or installed without a usable build
    _fused_scan = None


def selective_scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The recurrence one step at a time. u, delta [b, d, L]; A [d, n]; B, C [b, n, L];
    D [d] -> y [b, d, L]."""
    # unbind, not u[..., t]: the backward of L slices would write L full-size zero grads
    us, dts = u.unbind(-1), delta.unbind(-1)
    Bs, Cs = B.unbind(-1), C.unbind(-1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for x, dt, b, c in zip(us, dts, Bs, Cs, strict=True):
        dt = dt[..., None]                                          # [b, d, 1]
        h = torch.exp(dt * A) * h + (dt * x[..., None]) * b[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c))
    return torch.stack(ys, dim=-1) + D[:, None] * u


def selective_scan_parallel(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                            B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Same function as `selective_scan_sequential`, in ceil(log2 L) vectorised steps: an inclusive
    scan of h_t = a_t h_{t-1} + b_t, combining (a, b) pairs at doubling distances."""
    L = u.shape[-1]
    dA = delta.transpose(1, 2)[..., None]                           # [b, L, d, 1]
    a = torch.exp(dA * A)                                           # [b, L, d, n], in (0, 1]
    h = dA * B.transpose(1, 2)[:, :, None, :] * u.transpose(1, 2)[..., None]
    shift = 1
    while shift < L:
        # h_t <- a_t h_{t-shift} + h_t ; a_t <- a_t a_{t-shift}  (identity before the start)
        h = torch.cat([h[:, :shift], a[:, shift:] * h[:, :-shift] + h[:, shift:]], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    y = torch.einsum("bldn,bnl->bdl", h, C)
    return y + D[:, None] * u


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The optimized kernel when installed and on CUDA, else a PyTorch reference."""
    if u.is_cuda:
        if _fused_scan is not None:
            return _fused_scan(u.contiguous(), delta.contiguous(), A.contiguous(),
                               B.contiguous(), C.contiguous(), D.float())
        return selective_scan_parallel(u, delta, A, B, C, D)
    return selective_scan_sequential(u, delta, A, B, C, D)


class SSM(nn.Module):
    """One direction of the S6 layer: depthwise conv, input-dependent delta/B/C, the scan."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        # Mamba's initialisation: A = -(1..n) per channel, delta in [1e-3, 1e-1] at start
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float())
                                  .repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x [b, L, d_inner]
        L = x.shape[1]
        u = F.silu(self.conv(x.transpose(1, 2))[..., :L])           # causal: [b, d, L]
        dbc = self.x_proj(u.transpose(1, 2))                        # [b, L, r + 2n]
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)        # [b, d, L]
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D)
        return y.transpose(1, 2)                                    # [b, L, d]


class MambaBlock(nn.Module):
    """Pre-norm residual block: in_proj -> (forward scan + backward scan) * silu(gate) ->
    out_proj."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 bidirectional: bool = True) -> None:
        super().__init__()
        d_inner = expand * dim
        dt_rank = math.ceil(dim / 16)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.fwd = SSM(d_inner, d_state, dt_rank, d_conv)
        self.bwd = SSM(d_inner, d_state, dt_rank, d_conv) if bidirectional else None
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, gate = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        y = self.fwd(xs)
        if self.bwd is not None:
            y = y + self.bwd(xs.flip(1)).flip(1)
        return x + self.out_proj(y * F.silu(gate))


class VisionMamba(nn.Module):
    """forward(x [B, 3, H, W]) -> logits [B, num_classes]; H, W multiples of `patch`."""

    def __init__(self, num_classes: int = 100, dim: int = 64, depth: int = 4,
                 d_state: int = 16, expand: int = 2, patch: int = 4, d_conv: int = 4,
                 bidirectional: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(MambaBlock(dim, d_state, expand, d_conv, bidirectional)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` ([token map after the embedding and after each block as
        [B, dim, h, w], pooled feature], logits), as the zoo's CNNs (no ReLU here, so
        `preact` changes nothing)."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                            # [B, tokens, dim]
        feats = [x]
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        pooled = self.norm(x).mean(1)
        logits = self.head(pooled)
        if not is_feat:
            return logits
        maps = [f.transpose(1, 2).reshape(f.shape[0], -1, h, w) for f in feats]
        return [*maps, pooled], logits


def mamba_tiny(num_classes: int = 100, **kw) -> VisionMamba:
    return VisionMamba(num_classes, **{"dim": 64, "depth": 4, "d_state": 8, **kw})


def mamba_small(num_classes: int = 100, **kw) -> VisionMamba:
    return VisionMamba(num_classes, **{"dim": 128, "depth": 6, "d_state": 16, **kw})
