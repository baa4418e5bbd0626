"""Views of an :class:`ImageDataset` as the run path consumes it.

Amalgamation never reads labels: the engine trains on :class:`UnlabeledView` (or on
:class:`IndexedView` when teacher outputs come from the cache, whose rows are found by
sample index); algorithms calibrate on :func:`image_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError, RegistryError
from ..tasks.classification import NamedClassesTask
from .base import ImageDataset, build_dataset

if TYPE_CHECKING:
    from ..config import DataRef
    from ..interfaces import InputSpec, Task


class SampleView(Dataset):
    """A dataset of ``(image, label)`` items seen another way; :meth:`image` gives sample
    ``index``'s image whatever the view's items are (the Trainer fetches images by it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def image(self, index: int) -> Tensor:
        """The image of sample ``index``."""
        return self.dataset[index][0]


class UnlabeledView(SampleView):
    """The images of a dataset without its labels."""

    def __getitem__(self, index: int) -> Tensor:
        return self.image(index)


class IndexedView(SampleView):
    """``(index, image)`` pairs: the index finds a sample's cached teacher outputs."""

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        return index, self.image(index)


def image_batches(dataset: Dataset, batch_size: int = 256) -> Iterator[Tensor]:
    """The dataset's images in order, in batches, without labels."""
    yield from DataLoader(UnlabeledView(dataset), batch_size=batch_size, shuffle=False)


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
    """The images must have the channels and size the models expect."""
    got = (dataset.channels, *dataset.size)
    want = (spec.channels, *spec.size)
    if tuple(got) != tuple(want):
        raise ConfigError(f"{key}: images are {got[0]}x{got[1]}x{got[2]} but the models expect "
                          f"{want[0]}x{want[1]}x{want[2]}; set {key}.size (or use matching data)")


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
