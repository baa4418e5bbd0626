"""Adaptor heads (one per teacher target) and the geometry of student features.

An adaptor maps the student's feature vectors into one teacher's (balanced) feature
space: a LayerNorm-MLP with residual blocks, applied to every position of a map alike, as
RADIO's MLP adaptors are.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .balance import channels_first, channels_last


class ResidualBlock(nn.Module):
    """``x + Linear(GELU(LayerNorm(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(F.gelu(self.norm(x)))


class Adaptor(nn.Module):
    """LayerNorm-MLP from ``in_channels`` to ``out_channels`` through ``depth`` residual
    blocks of ``hidden`` channels. Takes (N, C) vectors or (N, C, H, W) maps (per position)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(in_channels, hidden)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, out_channels)

    def forward(self, feature: Tensor) -> Tensor:
        x = self.blocks(self.fc_in(channels_last(feature)))
        return channels_first(self.fc_out(F.gelu(self.norm(x))))


def token_grid(count: int, size: tuple[int, int], patch: int | None = None) -> tuple[int, int, int]:
    """``(prefix, rows, cols)`` of ``count`` tokens from an image of ``size``: leading class or
    register tokens, then a patch grid. ``patch``: the patch size, when the network says it;
    otherwise the largest stride whose grid leaves at most 8 leading tokens."""
    strides = [patch] if patch else range(1, max(size) + 1)
    for stride in strides:
        rows, cols = size[0] // stride, size[1] // stride
        if 0 <= count - rows * cols <= 8:
            return count - rows * cols, rows, cols
    raise ValueError(f"{count} tokens do not form a patch grid of a {size[0]}x{size[1]} image")


def as_map(feature: Tensor, size: tuple[int, int], patch: int | None = None) -> Tensor:
    """A student feature as an (N, C, H, W) map: maps stay, ViT tokens (N, L, C) lose their
    leading tokens and fold into their patch grid."""
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        prefix, rows, cols = token_grid(feature.shape[1], size, patch)
        return feature[:, prefix:].transpose(1, 2).reshape(feature.shape[0], -1, rows, cols)
    raise ValueError(f"expected a feature map (N, C, H, W) or tokens (N, L, C), got shape "
                     f"{tuple(feature.shape)}")


def summary_of(feature: Tensor, size: tuple[int, int], patch: int | None = None) -> Tensor:
    """A student feature as one (N, C) vector per image: vectors stay, tokens give their
    first (class) token when they have one, maps and patch tokens their mean."""
    if feature.dim() == 2:
        return feature
    if feature.dim() == 3:
        prefix, _, _ = token_grid(feature.shape[1], size, patch)
        return feature[:, 0] if prefix else feature.mean(1)
    if feature.dim() == 4:
        return feature.mean((2, 3))
    raise ValueError(f"expected a feature vector, map or tokens, got shape {tuple(feature.shape)}")


def resize_map(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an (N, C, H, W) map to ``size`` (no copy when it already is)."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
