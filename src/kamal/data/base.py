"""The dataset contract: items are ``(image in [0, 1], label)``, label -1 when unknown."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..plugins import get_registry
from .augment import RandomShift


class ImageDataset(Dataset):
    """Base for kamal datasets.

    ``classes`` names the label indices (``None`` for unlabeled data); ``channels`` and
    ``size`` describe the images; ``augmented`` says whether items are random (then
    teacher outputs cannot be cached); ``in_memory`` whether items are ready tensors (then
    DataLoader workers only add their start-up cost: ``data.workers: auto`` starts none).
    """

    classes: list[str] | None = None
    channels: int = 3
    size: tuple[int, int] = (32, 32)
    augmented: bool = False
    in_memory: bool = False

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        """Whether items carry labels that metrics can be computed against."""
        return self.classes is not None

    def without_augmentation(self) -> ImageDataset:
        """The same images without random augmentation, what calibration reads (a dataset
        that cannot switch it off returns itself)."""
        return self

    def fingerprint(self) -> str:
        """A digest of the images (the teacher cache's key); empty when the dataset cannot
        tell, then the config that built it stands in."""
        return ""

    def draw_augmentation(self, generator: torch.Generator | None = None) -> Tensor:
        """One random augmentation as the numbers that re-create it (a float64 vector),
        drawn from ``generator`` or torch's global generator. A dataset whose augmentation
        cannot be recorded leaves this unimplemented; stored views then refuse it."""
        raise NotImplementedError(f"{type(self).__name__} cannot record its augmentation")

    def augmented_source(self, index: int, params: Tensor) -> tuple[Any, Any]:
        """Sample ``index``'s ``(source image, label)`` under the augmentation ``params``
        (:meth:`draw_augmentation`): the image before any model's view, bit-exact for equal
        ``params``."""
        raise NotImplementedError(f"{type(self).__name__} cannot record its augmentation")

    @property
    def records_augmentation(self) -> bool:
        """Whether items are randomly augmented by recordable draws (stored views work)."""
        return self.augmented and (type(self).draw_augmentation
                                   is not ImageDataset.draw_augmentation)


class TensorImageDataset(ImageDataset):
    """Images held in memory as one tensor, with optional random-shift augmentation."""

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str] | None,
                 augment_shift: int = 0) -> None:
        self._digest = ""
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.classes = None if classes is None else [str(c) for c in classes]
        self.channels = int(images.shape[1])
        self.size = (int(images.shape[2]), int(images.shape[3]))
        self.augment_shift = augment_shift
        self.augmented = augment_shift > 0

    def without_augmentation(self) -> TensorImageDataset:
        plain = copy.copy(self)
        plain.augment_shift, plain.augmented = 0, False
        return plain

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str:
        if not self._digest:  # the images do not change: hash them once
            self._digest = tensor_digest(self.images)
        return self._digest

    def draw_augmentation(self, generator: torch.Generator | None = None) -> Tensor:
        return RandomShift(self.augment_shift).draw(generator)

    def augmented_source(self, index: int, params: Tensor) -> tuple[Tensor, int]:
        return RandomShift(self.augment_shift).apply(self.images[index], params), int(
            self.labels[index])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.augment_shift:
            return self.augmented_source(index, self.draw_augmentation())
        return self.images[index], int(self.labels[index])


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes."""
    import hashlib

    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def resize(images: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resize of an ``(N, C, H, W)`` batch to ``size``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False).clamp(0, 1)


def split_data_ref(text: str) -> tuple[str, str | None]:
    """``DATASET[:SPLIT]`` -> ``(dataset, split)``, where a dataset name may itself hold a
    colon: ``torchvision:ImageFolder`` is a family and its variant, ``digits:test`` a dataset
    and its split, ``torchvision:CIFAR10:test`` both."""
    family, _, rest = text.partition(":")
    if not rest:
        return text, None
    builder = get_registry().get("datasets", family)
    if "variant" in inspect.signature(builder).parameters:
        variant, _, split = rest.partition(":")
        return f"{family}:{variant}", split or None
    return family, rest


def build_dataset(name: str, split: str | None = None, options: dict[str, Any] | None = None,
                  key: str = "data") -> ImageDataset:
    """Build a registered dataset; ``"family:variant"`` names call ``family`` with ``variant``.

    ``key`` is the config path used in error messages.
    """
    options = dict(options or {})
    family, _, variant = name.partition(":")
    builder = get_registry().get("datasets", family)
    if variant:
        options["variant"] = variant
    params = inspect.signature(builder).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [k for k in params if k not in ("split", "variant")]
        raise ConfigError(f"{key}.{unknown[0]}: dataset '{family}' has no option "
                          f"{unknown[0]!r}; its options are: {', '.join(allowed) or 'none'}")
    try:
        return builder(split=split, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: dataset '{name}' rejected {options or 'its options'}: {exc}") from exc
