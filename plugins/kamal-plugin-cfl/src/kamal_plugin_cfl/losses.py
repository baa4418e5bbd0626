"""CFL's feature losses: multi-kernel RBF MMD between common features, reconstruction MSE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    # |x|^2 + |y|^2 - 2 x.y; clamped because rounding can make it slightly negative
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.t()).clamp_min(0)


def mmd_rbf(x: Tensor, y: Tensor, sigmas: Sequence[float], normalize: bool = True,
            kernel_reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Squared MMD between the samples ``x`` and ``y`` with a sum of Gaussian kernels.

    ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` for each ``sigma``; the biased estimator
    ``mean(Kxx) + mean(Kyy) - 2 mean(Kxy)`` as in KamalEngine. Features are flattened per
    sample and, with ``normalize``, L2-normalised (so distances lie in [0, 4] and the
    absolute ``sigmas`` keep their meaning). ``kernel_reduction="sum"`` adds the kernels
    (KamalEngine: the loss then grows with the number of bandwidths, up to 2 per kernel);
    ``"mean"`` averages them, keeping the loss in [0, 2] whatever the bandwidth set.
    """
    x, y = x.flatten(1), y.flatten(1)
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    dxx, dyy, dxy = _squared_distances(x, x), _squared_distances(y, y), _squared_distances(x, y)
    total = x.new_zeros(())
    for sigma in sigmas:
        gamma = 1.0 / (2.0 * sigma * sigma)
        total = total + (torch.exp(-gamma * dxx).mean() + torch.exp(-gamma * dyy).mean()
                         - 2 * torch.exp(-gamma * dxy).mean())
    if kernel_reduction == "mean":
        total = total / len(sigmas)
    return total.clamp_min(0)


def reconstruction_loss(reconstructions: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Mean squared error of each teacher's reconstructed feature, summed over teachers."""
    return sum((F.mse_loss(r, t) for r, t in zip(reconstructions, targets, strict=True)),
               start=reconstructions[0].new_zeros(()))
