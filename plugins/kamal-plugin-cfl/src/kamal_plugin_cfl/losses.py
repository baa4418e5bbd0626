"""CFL's feature losses: multi-kernel RBF MMD between common features, reconstruction MSE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


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
    return mmd_rbf_to_each(x, [y], sigmas, normalize, kernel_reduction)[0]


def mmd_rbf_to_each(x: Tensor, ys: Sequence[Tensor], sigmas: Sequence[float],
                    normalize: bool = True,
                    kernel_reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """:func:`mmd_rbf` of ``x`` to each of ``ys``, as one tensor ``(len(ys),)``.

    One kernel matrix over all the samples serves every pair: the estimator of pair ``t``
    is ``w_t^T K w_t`` with ``w_t`` holding ``1/n`` on ``x``'s rows and ``-1/m`` on
    ``ys[t]``'s. A handful of large operations instead of a few small ones per kernel and
    pair (on a CPU the small ones' overhead was the cost: half the time with two teachers).
    """
    parts = [f.flatten(1) for f in (x, *ys)]
    if normalize:
        parts = [F.normalize(f, dim=1) for f in parts]
    z = torch.cat(parts)
    squares = z.pow(2).sum(1)
    # |a|^2 + |b|^2 - 2 a.b; clamped because rounding can make it slightly negative
    distances = (squares[:, None] + squares[None, :] - 2 * z @ z.t()).clamp_min(0)
    gammas = distances.new_tensor([1.0 / (2.0 * s * s) for s in sigmas])
    kernel = torch.exp(-gammas[:, None, None] * distances).sum(0)
    weights = distances.new_zeros(len(ys), len(z))
    weights[:, :len(x)] = 1.0 / len(x)
    start = len(x)
    for t, y in enumerate(ys):
        weights[t, start:start + len(y)] = -1.0 / len(y)
        start += len(y)
    estimates = torch.einsum("ti,ij,tj->t", weights, kernel, weights)
    if kernel_reduction == "mean":
        estimates = estimates / len(sigmas)
    return estimates.clamp_min(0)


def reconstruction_loss(reconstructions: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Mean squared error of each teacher's reconstructed feature, summed over teachers."""
    return sum((F.mse_loss(r, t) for r, t in zip(reconstructions, targets, strict=True)),
               start=reconstructions[0].new_zeros(()))
