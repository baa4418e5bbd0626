"""Common-feature blocks: map the student's and each teacher's feature into one shared space.

A block has, per network, an *alignment* (to the hidden width), one *shared extractor*
applied to every aligned feature (its output is the common feature ``h``), and one
*decoder* per teacher that reconstructs that teacher's feature from its ``h``.
:class:`FCBlock` works on pooled vectors ``(N, C)``, :class:`ConvBlock` on feature maps
``(N, C, H, W)``; :func:`build_block` picks one from the features' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kamal import KamalError


@dataclass
class CommonFeatures:
    """What a block computes for one batch.

    ``student`` and ``teachers[i]`` are the common features ``h``; ``reconstructions[i]``
    is teacher ``i``'s feature decoded from its ``h`` and ``targets[i]`` what it must match.
    """

    student: Tensor
    teachers: list[Tensor]
    reconstructions: list[Tensor]
    targets: list[Tensor]


class FeatureScaler(nn.Module):
    """Per-channel standardisation with statistics measured once on unlabeled data.

    Until :meth:`calibrate` is called (or when disabled) it is the identity. The statistics
    are buffers, so they travel with checkpoints.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def calibrate(self, features: Tensor) -> None:
        """Measure the per-channel mean and spread of ``(N, C)`` or ``(N, C, H, W)`` features."""
        flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
        self.mean.copy_(flat.mean(dim=1))
        if flat.shape[1] < 2:
            return
        std = flat.std(dim=1)
        # near-constant channels (e.g. always-zero ReLUs) must not be blown up into noise
        self.std.copy_(std.clamp_min(0.1 * float(std.mean()) + 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class CommonFeatureBlock(nn.Module):
    """Shared structure of the FC and conv blocks (subclasses build the layers)."""

    def __init__(self, student_channels: int, teacher_channels: Sequence[int], hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden width must be positive, got {hidden}")
        self.student_channels = student_channels
        self.teacher_channels = list(teacher_channels)
        self.hidden = hidden
        self.scale_teachers = nn.ModuleList(FeatureScaler(c) for c in teacher_channels)
        self.align_student = self._align(student_channels)
        self.align_teachers = nn.ModuleList(self._align(c) for c in teacher_channels)
        self.extractor = self._extractor()
        self.decoders = nn.ModuleList(self._decoder(c) for c in teacher_channels)
        # the MMD's scale under the gradient cap, kept between measurements (checkpointed)
        self.register_buffer("mmd_scale", torch.ones(()))

    def _align(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def _extractor(self) -> nn.Module:
        raise NotImplementedError

    def _decoder(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def prepare(self, feature: Tensor) -> Tensor:
        """Bring a network's feature to the block's layout (identity for FC)."""
        return feature

    @torch.no_grad()
    def calibrate(self, teachers: Sequence[Tensor]) -> None:
        """Measure per-channel statistics for standardising each teacher's feature.

        ``teachers[i]`` holds teacher ``i``'s features of the calibration images, already
        through :meth:`prepare` (so maps are small). The student's feature is not
        standardised: its statistics change while it learns, and its trainable alignment
        adapts to its scale.
        """
        for scaler, feature in zip(self.scale_teachers, teachers, strict=True):
            scaler.calibrate(feature)

    def embed_student(self, feature: Tensor) -> Tensor:
        """The student's common feature."""
        return self.extractor(self.align_student(self.prepare(feature)))

    def forward(self, student: Tensor, teachers: Sequence[Tensor]) -> CommonFeatures:
        targets = [scale(self.prepare(f)) for scale, f in zip(self.scale_teachers, teachers,
                                                                strict=True)]
        common = [self.extractor(align(t)) for align, t in zip(self.align_teachers, targets,
                                                                strict=True)]
        recons = [decode(h) for decode, h in zip(self.decoders, common, strict=True)]
        return CommonFeatures(self.embed_student(student), common, recons, targets)


class FCBlock(CommonFeatureBlock):
    """Common-feature block for pooled features ``(N, C)`` (KamalEngine's ``CFL_FCBlock``).

    A feature map given to it is global-average-pooled first.
    """

    def prepare(self, feature: Tensor) -> Tensor:
        return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature

    def _align(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.Linear(channels, self.hidden), nn.ReLU(inplace=True))

    def _extractor(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.ReLU(inplace=True),
                             nn.Linear(self.hidden, self.hidden))

    def _decoder(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.Linear(self.hidden, channels), nn.ReLU(inplace=True),
                             nn.Linear(channels, channels))


class _ResBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class ConvBlock(CommonFeatureBlock):
    """Common-feature block for feature maps ``(N, C, H, W)`` (KamalEngine's ``CFL_ConvBlock``).

    Teachers' maps are resized to the student's spatial size (average pooling when larger,
    bilinear when smaller), so networks with different strides can share the space.
    """

    def __init__(self, student_channels: int, teacher_channels: Sequence[int], hidden: int,
                 size: tuple[int, int]) -> None:
        self.size = tuple(size)
        super().__init__(student_channels, teacher_channels, hidden)

    def prepare(self, feature: Tensor) -> Tensor:
        if tuple(feature.shape[-2:]) == self.size:
            return feature
        if feature.shape[-2] >= self.size[0] and feature.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(feature, self.size)
        return F.interpolate(feature, size=self.size, mode="bilinear", align_corners=False)

    def _align(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(channels, self.hidden, 1), nn.BatchNorm2d(self.hidden),
                             nn.ReLU(inplace=True))

    def _extractor(self) -> nn.Module:
        return nn.Sequential(_ResBlock(self.hidden), _ResBlock(self.hidden))

    def _decoder(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(self.hidden, self.hidden, 1), nn.BatchNorm2d(self.hidden),
                             nn.ReLU(inplace=True), nn.Conv2d(self.hidden, channels, 1))


MAX_PREFIX_TOKENS = 8  # class and register tokens ahead of a ViT's patch tokens


def as_features(feature: Tensor, owner: str, layer: str) -> Tensor:
    """A tapped feature as cfl uses it: a pooled vector ``(N, C)`` or a map ``(N, C, H, W)``.

    ViT tokens ``(N, T, C)`` become a map when ``T`` is a square patch grid after at most
    :data:`MAX_PREFIX_TOKENS` leading class/register tokens (which are dropped); any other
    shape is a one-line error naming ``owner``, ``layer`` and the shape.
    """
    if feature.dim() in (2, 4):
        return feature
    if feature.dim() == 3:
        n, tokens, channels = feature.shape
        grid = math.isqrt(tokens)
        prefix = tokens - grid * grid
        if grid > 0 and prefix <= MAX_PREFIX_TOKENS:
            return feature[:, prefix:].transpose(1, 2).reshape(n, channels, grid, grid)
    raise KamalError(
        f"cfl: {owner}'s layer '{layer}' gives features shaped {tuple(feature.shape)}; cfl "
        "accepts pooled vectors (N, C), feature maps (N, C, H, W) or ViT tokens (N, T, C) on a "
        f"square patch grid (after at most {MAX_PREFIX_TOKENS} class/register tokens). Choose "
        "another layer with algorithm.layer / algorithm.teacher_layers")


def build_block(student_shape: Sequence[int], teacher_shapes: Sequence[Sequence[int]],
                hidden: int) -> CommonFeatureBlock:
    """A :class:`ConvBlock` when every feature is a map ``(N, C, H, W)``, else an :class:`FCBlock`.

    Shapes include the batch dimension. Mixed maps and vectors use the FC block, which
    global-average-pools the maps.
    """
    shapes = [tuple(student_shape), *map(tuple, teacher_shapes)]
    bad = [s for s in shapes if len(s) not in (2, 4)]
    if bad:
        raise ValueError(f"CFL needs features shaped (N, C) or (N, C, H, W), got {bad[0]}")
    if all(len(s) == 4 for s in shapes):
        return ConvBlock(shapes[0][1], [s[1] for s in shapes[1:]], hidden, shapes[0][2:])
    return FCBlock(shapes[0][1], [s[1] for s in shapes[1:]], hidden)

