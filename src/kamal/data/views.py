"""Views of an :class:`ImageDataset` as the run path consumes it.

Amalgamation never reads labels: the engine trains on :class:`UnlabeledView` (or on
:class:`IndexedView` when teacher outputs come from the cache, whose rows are found by
sample index); algorithms calibrate on :func:`image_batches`.

Each model reads an image through its own :class:`~kamal.data.transforms.ImageView`; a
:class:`ViewPlan` lists the distinct views of a run and who reads which. Given views, a
dataset view decodes each source image once and gives one tensor per view (a tuple, which
the DataLoader collates; :meth:`ViewPlan.batch` makes it a
:class:`~kamal.data.transforms.ViewBatch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError, RegistryError
from ..tasks.classification import NamedClassesTask
from .base import ImageDataset, build_dataset
from .transforms import DENSE_KINDS, ImageView, ViewBatch

if TYPE_CHECKING:
    from ..config import DataRef
    from ..interfaces import InputSpec, Task


@dataclass(frozen=True)
class ViewPlan:
    """The distinct views of a run (the student's first) and which one each model reads."""

    views: tuple[ImageView, ...]
    student: int
    teachers: tuple[int, ...]

    @classmethod
    def of(cls, student: InputSpec, teachers: Sequence[InputSpec]) -> ViewPlan:
        """The plan for a student and its teachers' input specs."""
        views: list[ImageView] = [student.view]
        for spec in teachers:
            if spec.view not in views:
                views.append(spec.view)
        return cls(tuple(views), 0, tuple(views.index(spec.view) for spec in teachers))

    @property
    def mixed(self) -> bool:
        """Whether some model reads the images differently from the student."""
        return len(self.views) > 1

    def batch(self, data: Tensor | Sequence[Tensor]) -> Tensor | ViewBatch:
        """A loader's batch (a tensor for one view, a tuple for several) as models take it."""
        if isinstance(data, Tensor):
            return data
        return ViewBatch(dict(zip(self.views, data, strict=True)))


class SampleView(Dataset):
    """A dataset of ``(image, label)`` items seen another way; :meth:`image` gives sample
    ``index``'s image whatever the view's items are (the Trainer fetches images by it).

    With ``views``, each item's image is the source image through each view: a tensor for
    one view, a tuple of tensors for several (``image`` then gives a
    :class:`~kamal.data.transforms.ViewBatch` of the single image).
    """

    def __init__(self, dataset: Dataset, views: Sequence[ImageView] | None = None) -> None:
        self.dataset = dataset
        self.views = tuple(views) if views else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def pixels(self, index: int) -> Tensor | tuple[Tensor, ...]:
        """Sample ``index``'s image: as the dataset gives it, or through each view."""
        if self.views is None:
            return self.dataset[index][0]
        return self.through_views(source_image(self.dataset, index))

    def through_views(self, image: Any) -> Tensor | tuple[Tensor, ...]:
        """A source image through the views (a tensor for one view, a tuple for several)."""
        assert self.views is not None
        if len(self.views) == 1:
            return self.views[0](image)
        return tuple(view(image) for view in self.views)

    def image(self, index: int) -> Tensor | ViewBatch:
        """The image of sample ``index`` (a single-image ViewBatch for several views)."""
        pixels = self.pixels(index)
        if isinstance(pixels, Tensor):
            return pixels
        assert self.views is not None
        return ViewBatch(dict(zip(self.views, pixels, strict=True)))


class UnlabeledView(SampleView):
    """The images of a dataset without its labels."""

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, ...]:
        return self.pixels(index)


class IndexedView(SampleView):
    """``(index, image)`` pairs: the index finds a sample's cached teacher outputs."""

    def __getitem__(self, index: int) -> tuple[int, Tensor | tuple[Tensor, ...]]:
        return index, self.pixels(index)


class StoredViewRows(SampleView):
    """Every recorded augmentation of every sample, through the views: row ``i * K + k`` is
    sample ``i`` under ``params[i, k]`` (``params``: ``(N, K, P)``, see
    :meth:`~kamal.data.base.ImageDataset.draw_augmentation`). The teacher cache fills from it."""

    def __init__(self, dataset: Dataset, views: Sequence[ImageView], params: Tensor) -> None:
        super().__init__(dataset, views)
        self.params = params
        self.per_sample = int(params.shape[1])

    def __len__(self) -> int:
        return int(self.params.shape[0]) * self.per_sample

    def view_of(self, index: int, k: int) -> Tensor | tuple[Tensor, ...]:
        """Sample ``index`` under its ``k``-th recorded augmentation, through the views."""
        image, _ = augmented_source_item(self.dataset, index, self.params[index, k])
        return self.through_views(image)

    def __getitem__(self, row: int) -> Tensor | tuple[Tensor, ...]:
        return self.view_of(*divmod(row, self.per_sample))


class StoredViewSamples(StoredViewRows):
    """``(row, image)`` per sample: one of its recorded augmentations, picked at random each
    time it is read (torch's global generator, which kamal seeds and checkpoints), re-created
    from its numbers; ``row`` finds the teachers' cached outputs on exactly that image."""

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def __getitem__(self, index: int) -> tuple[int, Tensor | tuple[Tensor, ...]]:  # type: ignore[override]
        k = int(torch.randint(self.per_sample, ()))
        return index * self.per_sample + k, self.view_of(index, k)


class LabelledView(SampleView):
    """``(image, label)`` items with the image through the views (for evaluation)."""

    def __getitem__(self, index: int) -> tuple[Tensor | tuple[Tensor, ...], Any]:
        if self.views is None:
            return self.dataset[index]
        image, label = source_item(self.dataset, index)
        return self.through_views(image), label


def source_item(dataset: Dataset, index: int) -> tuple[Any, Any]:
    """``(source image, label)`` of sample ``index``: the image before any model's view
    (a PIL image for files), found through ``Subset`` wrappers."""
    dataset, index = _unwrapped(dataset, index)
    source = getattr(dataset, "source", None)
    return source(index) if source is not None else dataset[index]


def augmented_source_item(dataset: Dataset, index: int, params: Tensor) -> tuple[Any, Any]:
    """``(source image, label)`` of sample ``index`` under the recorded augmentation
    ``params``, found through ``Subset`` wrappers."""
    dataset, index = _unwrapped(dataset, index)
    return dataset.augmented_source(index, params)  # type: ignore[attr-defined]


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _unwrapped(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The dataset under any ``Subset`` wrappers, and ``index`` in it."""
    while isinstance(dataset, Subset):
        index = dataset.indices[index]
        dataset = dataset.dataset
    return dataset, index


def source_image(dataset: Dataset, index: int) -> Any:
    """The source image of sample ``index`` (see :func:`source_item`)."""
    return source_item(dataset, index)[0]


def image_batches(dataset: Dataset, batch_size: int = 256,
                  plan: ViewPlan | None = None) -> Iterator[Tensor | ViewBatch]:
    """The dataset's images in order, in batches, without labels: tensors, or with a mixed
    ``plan`` :class:`~kamal.data.transforms.ViewBatch` es."""
    views = plan.views if plan is not None else None
    for data in DataLoader(UnlabeledView(dataset, views), batch_size=batch_size, shuffle=False):
        yield plan.batch(data) if plan is not None else data


def calibration_sample(dataset: Dataset, count: int, seed: int) -> Dataset:
    """At most ``count`` samples of ``dataset``: all of them, or a fixed random subset (in
    index order) drawn from ``seed``."""
    total = len(dataset)  # type: ignore[arg-type]
    if total <= count:
        return dataset
    generator = torch.Generator().manual_seed(seed + 15485863)
    chosen = torch.randperm(total, generator=generator)[:count].sort().values.tolist()
    return Subset(dataset, chosen)


def dataset_from_ref(ref: DataRef, key: str) -> ImageDataset:
    """Build the dataset a config section names; errors carry the config path ``key``."""
    try:
        return build_dataset(ref.dataset, ref.split, ref.options, key=key)
    except RegistryError as exc:
        raise ConfigError(f"{key}.dataset: {exc}") from None


def check_data_matches(dataset: ImageDataset, spec: InputSpec, key: str) -> None:
    """The images must have the channels the models read (each model resizes and crops
    them through its own view)."""
    if dataset.channels != spec.channels:
        raise ConfigError(f"{key}: images have {dataset.channels} channel(s) but the models read "
                          f"{spec.channels}; set {key}.channels (or use matching data)")


def check_views(plan: ViewPlan, teachers: Sequence[Any], algorithm: str, accepts_mixed: bool,
                mixed_algorithms: Callable[[], Sequence[str]]) -> None:
    """Teachers reading images differently from the student need an algorithm that accepts
    it; a dense teacher's maps must cover the part of the image the student's cover."""
    student = plan.views[plan.student]
    differ = [(t, plan.views[v]) for t, v in zip(teachers, plan.teachers, strict=True)
              if v != plan.student]
    if differ and not accepts_mixed:
        listing = "; ".join(f"'{t.name}' reads {view.describe()}" for t, view in differ)
        raise ConfigError(
            f"algorithm '{algorithm}' compares the teachers and the student at the same pixels, "
            f"so every teacher must read the images as the student does ({student.describe()}), "
            f"but {listing}. Set student.input to the teachers' input, or use an algorithm "
            f"that takes each teacher at its own resolution ({', '.join(mixed_algorithms())})")
    for teacher, view in differ:
        dense = [task.name for task in teacher.tasks if task.kind in DENSE_KINDS]
        if dense and view.field() != student.field():
            raise ConfigError(
                f"teacher '{teacher.name}' ({', '.join(dense)}) reads {view.describe()}, which "
                f"covers another part of the image than the student's {student.describe()}, so "
                "its maps would not line up with the student's; give the student the same "
                "resize and crop (student.input: resize, resize_to or crop_pct)")


def require_labels(dataset: ImageDataset, key: str) -> None:
    """Metrics need labels: refuse unlabelled evaluation data instead of an empty table."""
    if not dataset.labelled:
        raise ConfigError(f"{key}: this data has no labels, so nothing can be scored on it; use "
                          "labelled data (an image folder: labels: folders, one subfolder per "
                          "class) or leave it out")


def check_label_names(dataset: ImageDataset, tasks: Sequence[Task], owner: str, key: str,
                      every_class: bool) -> None:
    """The data's class names must mean something to ``owner``'s named-class tasks: all of
    them (``every_class``, for the student) or at least one (a teacher knows a subset)."""
    if not dataset.classes:
        return
    for task in tasks:
        if not isinstance(task, NamedClassesTask):
            continue
        known = task.classes
        unknown = [c for c in dataset.classes if c not in set(known)]
        if (every_class and unknown) or len(unknown) == len(dataset.classes):
            shown = unknown if every_class else dataset.classes
            raise ConfigError(
                f"{key}: the data's classes {_names(shown)} are not classes of {owner}'s task "
                f"'{task.name}' ({_names(known)}); name the data's folders (or the model's "
                "classes) alike")


def _names(names: Sequence[str]) -> str:
    return ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
