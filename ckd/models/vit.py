"""A small Vision Transformer for 32x32 inputs, in plain PyTorch.

Patch 4 (an 8x8 grid of tokens at 32x32), a class token, learned position embeddings,
pre-norm transformer blocks (torch's scaled_dot_product_attention), a linear head on the
class token. Other image sizes work too: the position embeddings are resized bilinearly to
the token grid (16x16 digits -> a 4x4 grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """forward(x [B, 3, H, W]) -> logits [B, num_classes]; H, W multiples of `patch`."""

    def __init__(self, num_classes: int = 100, dim: int = 128, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 2.0, patch: int = 4, img_size: int = 32,
                 in_chans: int = 3) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT dim {dim} must be a multiple of heads {heads}")
        self.grid = img_size // patch
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init)

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        d = self.pos_embed.shape[-1]
        grid = self.pos_embed.view(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` ([patch-token map after the embedding and after each block
        as [B, dim, h, w], the normed class token], logits), as the zoo's CNNs (`preact`
        changes nothing)."""
        x = self.patch_embed(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self._pos(gh, gw)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        feats = [x]
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        pooled = self.norm(x[:, 0])
        logits = self.head(pooled)
        if not is_feat:
            return logits
        maps = [f[:, 1:].transpose(1, 2).reshape(f.shape[0], -1, gh, gw) for f in feats]
        return [*maps, pooled], logits


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vit_tiny(num_classes: int = 100, **kw) -> ViT:
    return ViT(num_classes, **{"dim": 96, "depth": 4, "heads": 3, **kw})


def vit_small(num_classes: int = 100, **kw) -> ViT:
    return ViT(num_classes, **{"dim": 192, "depth": 6, "heads": 3, **kw})
