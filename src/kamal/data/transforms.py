"""How one model sees an image: the eval transform of its library, reproduced pixel for pixel.

An :class:`ImageView` turns a source image (a PIL image read from disk, or a float tensor in
[0, 1] from an in-memory dataset) into the ``(C, H, W)`` float tensor in [0, 1] a model
reads: resize, centre crop, convert. Normalisation is not part of it: every kamal model
normalises with its own mean/std (:class:`~kamal.InputSpec`).

Two resizes, as the libraries define them:

* ``shorter``: the shorter side to ``resize_to`` (the longer one in proportion, rounded
  down), then the centre ``size`` crop: timm's ``crop_mode: center`` (``resize_to`` is
  ``floor(size / crop_pct)``), transformers' ``size: {shortest_edge}`` + ``crop_size``;
* ``squash``: both sides to ``resize_to`` (aspect not kept), then the centre crop: timm's
  ``crop_mode: squash``, transformers' ``size: {height, width}``.

Two backends, each reproducing one library's resampling and crop rounding:

* ``pil``: PIL's resize of the decoded 8-bit image, crop offsets rounded
  (torchvision's transforms on PIL images, as timm's ``create_transform`` uses them);
* ``tensor``: torchvision's antialiased resize of the 8-bit tensor, crop offsets floored
  (transformers' default image processors).

In-memory float images always resample as float tensors (there is no 8-bit image to give
PIL); a view that keeps their size and crops nothing returns them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image

# task kinds whose outputs are maps over the image (their pixels must line up across views)
DENSE_KINDS = ("segmentation", "depth")
RESIZES = ("shorter", "squash")
BACKENDS = ("pil", "tensor")
PIL_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class ImageView:
    """A model's eval transform (hashable: equal views share one tensor per batch).

    ``resize_to`` is ``(S,)`` for ``shorter`` (the shorter side) or ``(H, W)`` for
    ``squash``; the centre ``size`` crop follows.
    """

    channels: int
    size: tuple[int, int]
    resize: str = "shorter"
    resize_to: tuple[int, ...] = ()
    interpolation: str = "bilinear"
    backend: str = "tensor"

    def __post_init__(self) -> None:
        if not self.resize_to:  # no crop: resize straight to the size
            object.__setattr__(self, "resize_to", (min(self.size),) if self.resize == "shorter"
                               else tuple(self.size))

    def describe(self) -> str:
        """E.g. ``224x224 (shorter side 256, bicubic, pil)``."""
        h, w = self.size
        how = ("shorter side " if self.resize == "shorter" else "squash to ") + "x".join(
            str(s) for s in self.resize_to)
        return f"{h}x{w} ({how}, {self.interpolation}, {self.backend})"

    def field(self) -> tuple[Any, ...]:
        """Which part of the image the output covers: dense outputs of two views align
        pixel to pixel (after resizing) only when their fields are equal."""
        h, w = self.size
        if self.resize == "shorter":
            (side,) = self.resize_to
            return ("shorter", round(h / side, 4), round(w / side, 4))
        return ("squash", round(h / self.resize_to[0], 4), round(w / self.resize_to[1], 4))

    def __call__(self, image: Image | Tensor) -> Tensor:
        """The ``(C, H, W)`` float tensor in [0, 1] the model reads."""
        if isinstance(image, Tensor):
            return self._tensor(image.float() if not image.is_floating_point()
                                and image.dtype != torch.uint8 else image)
        if self.backend == "pil":
            return self._pil(image)
        from torchvision.transforms.functional import pil_to_tensor

        return self._tensor(pil_to_tensor(image))

    # --- the resampling ------------------------------------------------------------------

    def _scaled(self, height: int, width: int) -> tuple[int, int]:
        if self.resize == "squash":
            return self.resize_to[0], self.resize_to[1]
        (side,) = self.resize_to
        if height <= width:  # torchvision's rule: the longer side rounded down
            return side, int(side * width / height)
        return int(side * height / width), side

    def _pil(self, image: Image) -> Tensor:
        from PIL import Image as PILImage
        from torchvision.transforms.functional import pil_to_tensor

        height, width = image.height, image.width
        new_h, new_w = self._scaled(height, width)
        if (new_h, new_w) != (height, width):
            resample = getattr(PILImage.Resampling, self.interpolation.upper())
            image = image.resize((new_w, new_h), resample)
        top = int(round((new_h - self.size[0]) / 2.0))
        left = int(round((new_w - self.size[1]) / 2.0))
        if (top, left) != (0, 0) or (new_h, new_w) != self.size:
            image = image.crop((left, top, left + self.size[1], top + self.size[0]))
        return pil_to_tensor(image).float() / 255.0

    def _tensor(self, image: Tensor) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2.functional import resize  # v2: uint8 kernels, as transformers

        height, width = image.shape[-2:]
        new_h, new_w = self._scaled(height, width)
        if (new_h, new_w) != (height, width):
            mode = InterpolationMode(self.interpolation)
            image = resize(image, [new_h, new_w], interpolation=mode, antialias=True)
        if new_h < self.size[0] or new_w < self.size[1]:  # as torchvision's CenterCrop: zeros
            pad_h, pad_w = max(self.size[0] - new_h, 0), max(self.size[1] - new_w, 0)
            image = torch.nn.functional.pad(
                image, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2])
            new_h, new_w = image.shape[-2:]
        if (new_h, new_w) != self.size:
            top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
            image = image[..., top:top + self.size[0], left:left + self.size[1]]
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        return image.clamp(0, 1) if (new_h, new_w) != (height, width) else image


def view_problem(channels: int, size: Sequence[int], resize: str, resize_to: Sequence[int],
                 interpolation: str, backend: str) -> str | None:
    """What is wrong with these view settings (``None``: nothing), as a phrase for an error."""
    if resize not in RESIZES:
        return f"resize '{resize}' is not one of {', '.join(RESIZES)}"
    if backend not in BACKENDS:
        return f"backend '{backend}' is not one of {', '.join(BACKENDS)}"
    allowed = PIL_INTERPOLATIONS if backend == "pil" else TENSOR_INTERPOLATIONS
    if interpolation not in allowed:
        return (f"interpolation '{interpolation}' is not one of {', '.join(allowed)} "
                f"(backend {backend})")
    if channels not in (1, 3):
        return f"{channels} channels (kamal reads 1-channel or RGB images)"
    if len(size) != 2 or not all(1 <= int(s) <= 8192 for s in size):
        return f"size {'x'.join(str(s) for s in size)} (need height and width, each 1 to 8192)"
    want = 1 if resize == "shorter" else 2
    if resize_to and (len(resize_to) != want or not all(1 <= int(s) <= 16384 for s in resize_to)):
        return f"resize_to {list(resize_to)} (need {want} value(s), each 1 to 16384, for {resize})"
    if resize_to and (int(resize_to[0]) < max(size) if resize == "shorter" else
                      any(int(r) < int(s) for r, s in zip(resize_to, size, strict=True))):
        return f"resize_to {list(resize_to)} is smaller than the crop {list(size)}"
    return None


class ViewBatch:
    """One batch of images as each model of a run reads it: a tensor per distinct view.

    Where the models of a run read images differently (size, crop, resampling), algorithms
    receive these instead of a tensor in :meth:`~kamal.Amalgamator.setup` (when they declare
    ``mixed_views``). A :class:`~kamal.Teacher` called on one picks its own view;
    :meth:`for_model` gives any model's. ``len`` is the number of images; slicing, ``to``,
    :meth:`cat` and :meth:`stack` work as for tensors.
    """

    def __init__(self, tensors: dict[ImageView, Tensor]) -> None:
        if not tensors:
            raise ValueError("a ViewBatch needs at least one view")
        self.tensors = dict(tensors)

    def for_model(self, model: Any) -> Tensor:
        """The images as ``model`` (anything with an ``input_spec``) reads them."""
        view = model.input_spec.view
        try:
            return self.tensors[view]
        except KeyError:
            from ..errors import KamalError

            known = "; ".join(v.describe() for v in self.tensors)
            raise KamalError(f"this batch has no images for a model reading {view.describe()} "
                             f"(it has: {known})") from None

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def __getitem__(self, index: slice) -> ViewBatch:
        return ViewBatch({view: value[index] for view, value in self.tensors.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        """The same views on ``device`` (``self`` when they are there already, as a tensor's
        ``to`` does)."""
        moved = {view: value.to(device, non_blocking=non_blocking)
                 for view, value in self.tensors.items()}
        if all(moved[view] is value for view, value in self.tensors.items()):
            return self
        return ViewBatch(moved)

    @staticmethod
    def cat(batches: Sequence[ViewBatch]) -> ViewBatch:
        """Batches joined along the batch dimension."""
        return ViewBatch({view: torch.cat([b.tensors[view] for b in batches])
                          for view in batches[0].tensors})

    @staticmethod
    def stack(samples: Sequence[ViewBatch]) -> ViewBatch:
        """Single images (unbatched views) stacked into a batch."""
        return ViewBatch({view: torch.stack([s.tensors[view] for s in samples])
                          for view in samples[0].tensors})


def model_input(model: Any, images: Tensor | ViewBatch) -> Tensor:
    """``images`` as ``model`` reads them: a tensor as it is, a :class:`ViewBatch`'s view."""
    return images.for_model(model) if isinstance(images, ViewBatch) else images
