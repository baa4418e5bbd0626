"""Teacher balancing: map each teacher's features to a space where every teacher weighs
the same, invertibly (so the student's predictions map back to the teacher's own space).

``none``
    identity.
``standardize``
    per channel: subtract the mean, divide by the standard deviation.
``phi-s``
    PHI-S (Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
    Distillation", 2024): subtract the mean, rotate into the covariance's eigenbasis, then
    by a normalised Hadamard matrix, and scale by one number. The Hadamard rotation spreads
    the total variance evenly over every output channel, so after the single scale every
    channel has unit variance while the map stays a rotation (distances are kept up to the
    scale). Sylvester's construction needs a power-of-two size: features of other widths
    are zero-padded to the next power of two first; the inverse drops the padding again,
    exactly (the padded channels carry no variance).

Each normaliser is estimated once, from the teacher's features on the transfer data, and
kept as buffers, so a saved student can map its predictions back without the data.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Balance = Literal["none", "standardize", "phi-s"]
BALANCES: tuple[str, ...] = ("none", "standardize", "phi-s")


def normalised_width(channels: int, balance: str) -> int:
    """Channels of a feature of ``channels`` after ``balance`` (PHI-S pads to a power of 2)."""
    return 1 << (channels - 1).bit_length() if balance == "phi-s" else channels


def hadamard(size: int) -> Tensor:
    """Sylvester's Hadamard matrix of ``size`` (a power of 2), scaled to be orthonormal."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {size}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / math.sqrt(size)


class FeatureNormalizer(nn.Module):
    """An invertible affine map of feature vectors (channels last): ``(x - mean) @ forward.T``
    and back with ``y @ inverse.T + mean``. Buffers only; :meth:`fit` estimates them."""

    def __init__(self, channels: int, balance: str) -> None:
        super().__init__()
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        self.balance = balance
        self.channels = channels
        width = normalised_width(channels, balance)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("forward_matrix", torch.eye(width, channels))
        self.register_buffer("inverse_matrix", torch.eye(channels, width))

    @property
    def width(self) -> int:
        """Channels of the normalised features."""
        return int(self.forward_matrix.shape[0])

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """Estimate the map from ``features`` (samples, channels)."""
        x = features.detach().double().reshape(-1, self.channels)
        self.fit_moments(x.shape[0], x.sum(0), x.T @ x)

    @torch.no_grad()
    def fit_moments(self, count: int, total: Tensor, outer: Tensor) -> None:
        """Estimate the map from the moments of ``count`` feature vectors: their sum
        ``total`` (C,) and the sum of their outer products ``outer`` (C, C); float64 inside.
        (Moments, so a large teacher's maps need not be held at once.)"""
        if count < 2:
            raise ValueError("balancing needs at least two feature vectors to estimate from")
        mean = total.double() / count
        covariance = (outer.double() - count * torch.outer(mean, mean)) / (count - 1)
        if self.balance == "none":
            mean = torch.zeros_like(mean)
            forward = torch.eye(self.width, self.channels, dtype=torch.float64)
            inverse = forward.T.clone()
        elif self.balance == "standardize":
            std = covariance.diagonal().clamp_min(1e-12).sqrt()
            forward, inverse = torch.diag(1 / std), torch.diag(std)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            total_variance = float(eigenvalues.clamp_min(0).sum())
            # the rotation spreads the total variance over ``width`` channels: scale to 1 each
            scale = math.sqrt(self.width / max(total_variance, 1e-12))
            rotation = hadamard(self.width)[:, :self.channels] @ eigenvectors.T  # (width, C)
            forward = scale * rotation
            inverse = rotation.T / scale   # rotation.T @ rotation = I (orthonormal columns)
        self.mean.copy_(mean)
        self.forward_matrix.copy_(forward)
        self.inverse_matrix.copy_(inverse)

    def forward(self, features: Tensor) -> Tensor:
        """Teacher space -> balanced space, on the last dimension."""
        return (features - self.mean) @ self.forward_matrix.T

    def inverse(self, normalised: Tensor) -> Tensor:
        """Balanced space -> the teacher's own space, on the last dimension."""
        return normalised @ self.inverse_matrix.T + self.mean


def channels_last(feature: Tensor) -> Tensor:
    """(N, C) stays; (N, C, H, W) -> (N, H, W, C): channels on the last dimension."""
    return feature.movedim(1, -1) if feature.dim() == 4 else feature


def channels_first(feature: Tensor) -> Tensor:
    """The inverse of :func:`channels_last`."""
    return feature.movedim(-1, 1) if feature.dim() == 4 else feature
