"""Random augmentations drawn as numbers, so that a recorded draw re-creates its image.

Every augmentation here is split in two: ``draw`` (the randomness: a float64 vector, from a
given generator or torch's global one, which kamal seeds and checkpoints) and ``apply``
(deterministic: the same numbers give the same pixels, bit for bit). The teacher cache's
stored views (``train.teacher_cache_views``, the idea of FKD) record the numbers of K draws
per image and re-create each view from them when the student trains on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class RandomShift:
    """Shift by up to ``max_shift`` pixels each way, zeros shifted in: ``(dx, dy)``."""

    max_shift: int

    def draw(self, generator: torch.Generator | None = None) -> Tensor:
        s = self.max_shift
        return torch.randint(-s, s + 1, (2,), generator=generator).double()

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        s = self.max_shift
        dx, dy = (int(v) for v in params.tolist())
        return torch.roll(F.pad(image, (s, s, s, s)), (dy, dx), dims=(1, 2))[:, s:-s, s:-s]


@dataclass(frozen=True)
class RandomCropFlip:
    """torchvision's RandomResizedCrop box and a horizontal flip, for images of any size.

    Five numbers, independent of the image's size: the crop's area (a fraction in
    ``[min_area, 1]``), its log aspect ratio (uniform in ``log 3/4 .. log 4/3``), its place
    (two fractions of the free room) and the flip (1 or 0). The box is fitted inside the
    image (a side longer than the image's is shortened), so there is no rejection loop whose
    outcome would depend on the image. Models then read the crop through their own view.
    """

    min_area: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_area <= 1:
            raise ValueError(f"min_area must be in (0, 1], got {self.min_area}")

    def draw(self, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(5, generator=generator, dtype=torch.float64)
        area = self.min_area + (1 - self.min_area) * u[0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1]
        return torch.stack([area, log_ratio, u[2], u[3], (u[4] < 0.5).double()])

    @staticmethod
    def box(params: Tensor, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the crop on a ``width`` x ``height`` image."""
        area, log_ratio, fx, fy, _ = params.tolist()
        target = area * width * height
        ratio = math.exp(log_ratio)
        w = min(width, max(1, round(math.sqrt(target * ratio))))
        h = min(height, max(1, round(math.sqrt(target / ratio))))
        left = min(width - w, int(fx * (width - w + 1)))
        top = min(height - h, int(fy * (height - h + 1)))
        return left, top, left + w, top + h

    def apply(self, image: Image, params: Tensor) -> Image:
        from PIL import Image as PILImage

        cropped = image.crop(self.box(params, *image.size))
        if params[4] > 0.5:
            cropped = cropped.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        return cropped


def draw_views(draw: Callable[[torch.Generator | None], Tensor], count: int, views: int,
               seed: int) -> Tensor:
    """``(count, views, P)`` parameters: ``views`` draws per sample from one generator seeded
    with ``seed`` (the same every time, so stored views are reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([draw(generator) for _ in range(views)])
                        for _ in range(count)])
