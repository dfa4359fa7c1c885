"""A Vision Transformer of DeiT-Tiny's size (`vit_tiny`: width 192, 12 blocks of 3 heads, MLP 768):
patch 4 for inputs under 128 pixels (64 tokens at 32x32), 16 from 128 on (196 at 224).

Its blocks follow torchvision's VisionTransformer (pre-norm, GELU MLP, class token, learned position
embedding), with one change: attention projects queries, keys and values with three Linear layers
and reads its head count from their width, so an attention head -- its rows in q, k and v and its
columns in the output projection -- can be removed (`Attention.prune_heads`). nn.MultiheadAttention
packs q/k/v into one parameter and fixes the inner width to the model width, so it cannot lose a head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distswitch.models.registry import MODELS


class Attention(nn.Module):
    """Multi-head self-attention whose heads are units: head h is rows h*head_dim.. of q, k, v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, heads * self.head_dim) for _ in range(3))
        self.proj = nn.Linear(heads * self.head_dim, dim)

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (layer(x).view(b, n, -1, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    @torch.no_grad()
    def prune_heads(self, heads: list[int]) -> None:
        """Remove these heads in place (their q/k/v rows, their output-projection columns)."""
        drop = set(heads)
        keep = torch.tensor(
            [i for h in range(self.heads) if h not in drop for i in range(h * self.head_dim, (h + 1) * self.head_dim)],
            dtype=torch.long,
        )
        for name in ("q", "k", "v"):
            old = getattr(self, name)
            new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None).to(old.weight)
            new.weight.copy_(old.weight[keep])
            if old.bias is not None:
                new.bias.copy_(old.bias[keep])
            setattr(self, name, new)
        old = self.proj
        self.proj = nn.Linear(len(keep), old.out_features, bias=old.bias is not None).to(old.weight)
        self.proj.weight.copy_(old.weight[:, keep])
        if old.bias is not None:
            self.proj.bias.copy_(old.bias)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp: int = 768,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"vit_tiny: image size {image_size} is not a multiple of its patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, (image_size // patch) ** 2 + 1, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit_tiny")
def vit_tiny(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return VisionTransformer(in_channels, num_classes, image_size, patch=4 if image_size < 128 else 16)
