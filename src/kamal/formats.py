"""Teacher formats: how a library's model repo is recognised and loaded as a kamal model.

A format (contract for plugins, hook ``register_teacher_formats``) says from a repo's files
and ``config.json`` whether the repo is one of its library's, and builds the network with
its weights. The core does the rest the same way for every format: it refuses pickled
weights, picks the format (``format:`` in the teacher reference, else the one format that
recognises the repo), names the extra a format needs when its library is missing, and
wraps the model as a frozen :class:`~kamal.Teacher` with its provenance.

Built in: ``kamal`` (kamal's model repos), ``timm`` (timm's Hub layout, extra
``kamal-core[timm]``) and ``torchvision`` (a torchvision classification model's
``state_dict`` in ``model.safetensors`` with a small ``config.json``, below).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ModelRepoError

if TYPE_CHECKING:
    from .interfaces import Student

Classes = list[str] | dict[int, str] | None


class TeacherFormat:
    """Recognises and loads one library's model repos (contract for plugins).

    ``extra`` names what a user installs for this format (e.g. ``"kamal-core[timm]"``);
    kamal shows it when loading fails with an ImportError. ``load`` must read weights only
    from safetensors files and never run code from the repo.
    """

    name: ClassVar[str]
    extra: ClassVar[str | None] = None

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        """Whether ``folder`` (with its parsed ``config.json``, or None) is this format's."""
        raise NotImplementedError

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        """The network with its weights loaded (strictly), tasks named after ``name``.
        ``classes`` (from the teacher reference) selects or names the classes, if given."""
        raise NotImplementedError


class KamalFormat(TeacherFormat):
    """kamal's model repos: ``config.json`` with architecture, tasks and input."""

    name = "kamal"

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        return bool(config) and {"architecture", "tasks", "input"} <= set(config or {})

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        from .repo import load_model

        if classes is not None:
            raise ModelRepoError("'classes' does not apply to kamal model repos: they name their "
                                 "classes in config.json")
        return load_model(folder)


class TimmFormat(TeacherFormat):
    """timm's Hub layout: ``config.json`` with ``architecture`` and ``pretrained_cfg``."""

    name = "timm"
    extra = "kamal-core[timm]"

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        from .models.timm_models import is_timm_repo

        return is_timm_repo(folder)

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        from .models.timm_models import load_timm_model

        return load_timm_model(folder, name, classes)


class TorchvisionFormat(TeacherFormat):
    """A torchvision classification model: ``config.json`` as below and the model's
    ``state_dict`` in ``model.safetensors``::

        {"library": "torchvision", "architecture": "resnet18", "num_classes": 10,
         "label_names": ["plane", ...], "input_size": [3, 224, 224],
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    """

    name = "torchvision"

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        return (config or {}).get("library") == "torchvision"

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        from safetensors.torch import load_file

        from .models.base import KamalModel
        from .tasks.classification import ClassificationTask

        config = json.loads((folder / "config.json").read_text())
        head = int(config.get("num_classes") or 0)
        labels = [str(n) for n in config.get("label_names") or []]
        indices, names, guessed = select_classes(folder, head, labels, classes)
        size = config.get("input_size") or [3, 224, 224]
        spec = check_input_spec(folder, size, config.get("mean") or (0.485, 0.456, 0.406),
                                config.get("std") or (0.229, 0.224, 0.225))
        task = ClassificationTask(name, names)
        task.guessed_names = guessed
        kwargs = {"model_name": str(config.get("architecture")), "num_classes": head,
                  "class_indices": indices}
        model = KamalModel("torchvision", [task], spec, kwargs)
        try:  # the tensors are assigned, not copied: one copy of the weights in memory
            model.net.model.load_state_dict(load_file(str(folder / "model.safetensors")),
                                            strict=True, assign=True)
        except (RuntimeError, OSError) as exc:
            raise ModelRepoError(f"weights in {folder} do not match torchvision "
                                 f"'{config.get('architecture')}': {str(exc)[:300]}") from None
        return model


def select_classes(folder: Path, head: int, labels: list[str], classes: Classes
                   ) -> tuple[list[int], list[str], bool]:
    """(head indices, class names, whether the names were guessed from indices) for a
    classifier with ``head`` outputs named ``labels`` (may be empty), as ``classes`` asks."""
    if head <= 0:
        raise ModelRepoError(f"{folder}/config.json: num_classes must be a positive number")
    names = labels if len(labels) == head else [str(i) for i in range(head)]
    if classes is None:
        return list(range(head)), names, len(labels) != head
    if isinstance(classes, dict):
        bad = [i for i in classes if not 0 <= int(i) < head]
        if bad:
            raise ModelRepoError(f"{folder}: class indices {bad} are outside the head's 0..{head - 1}")
        return [int(i) for i in classes], [str(n) for n in classes.values()], False
    missing = [c for c in classes if str(c) not in names]
    if missing:
        raise ModelRepoError(f"{folder}: classes {missing} are not among this model's labels; "
                             "select them by index instead: classes: {index: name}")
    return [names.index(str(c)) for c in classes], [str(c) for c in classes], False


def check_input_spec(folder: Path, size: Any, mean: Any, std: Any):
    """An :class:`~kamal.InputSpec` from a repo's preprocessing values, or a clear error for
    absurd ones (size 0, negative or huge, std 0, a channel count that does not match)."""
    from .interfaces import InputSpec

    try:
        channels, height, width = (int(v) for v in size)
        mean, std = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError):
        raise ModelRepoError(f"{folder}/config.json: input_size must be [channels, height, width] "
                             f"and mean/std lists of numbers, got {size}, {mean}, {std}") from None
    problems = []
    if channels not in (1, 3, 4):
        problems.append(f"{channels} channels")
    if not (1 <= height <= 8192 and 1 <= width <= 8192):
        problems.append(f"size {height}x{width}")
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        problems.append(f"{len(mean)} mean / {len(std)} std values for {channels} channels")
    if any(s <= 0 for s in std):
        problems.append(f"std {std} (must be positive)")
    if problems:
        raise ModelRepoError(f"{folder}/config.json: the preprocessing values make no sense: "
                             f"{'; '.join(problems)}")
    return InputSpec(channels, (height, width), tuple(mean), tuple(std))
