"""Teacher formats: how a library's model repo is recognised and loaded as a kamal model.

A format (contract for plugins, hook ``register_teacher_formats``) says from a repo's files
and ``config.json`` whether the repo is one of its library's, and builds the network with
its weights. The core does the rest the same way for every format: it refuses pickled
weights, picks the format (``format:`` in the teacher reference, else the one format that
recognises the repo), names the extra a format needs when its library is missing, and
wraps the model as a frozen :class:`~kamal.Teacher` with its provenance.

Built in: ``kamal`` (kamal's model repos), ``timm`` (timm's Hub layout, extra
``kamal-core[timm]``), ``transformers`` (extra ``kamal-core[transformers]``) and
``torchvision`` (a torchvision classification model's ``state_dict`` in
``model.safetensors`` with a small ``config.json``, below).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ModelRepoError
from .models.repo_values import Classes, check_input_spec, select_classes

if TYPE_CHECKING:
    from .interfaces import Student



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


class TransformersFormat(TeacherFormat):
    """transformers' layout: ``config.json`` with ``model_type`` and ``architectures``;
    image classification, semantic segmentation and depth estimation heads."""

    name = "transformers"
    extra = "kamal-core[transformers]"

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        from .models.transformers_models import is_transformers_repo

        return is_transformers_repo(config)

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        from .models.transformers_models import load_transformers_model

        return load_transformers_model(folder, name, classes)


class TorchvisionFormat(TeacherFormat):
    """A torchvision classification model: ``config.json`` as below and the model's
    ``state_dict`` in ``model.safetensors``::

        {"library": "torchvision", "architecture": "resnet18", "num_classes": 10,
         "label_names": ["plane", ...], "input_size": [3, 224, 224],
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
         "resize_size": 256, "interpolation": "bilinear"}

    ``resize_size`` and ``interpolation`` are the eval transform of torchvision's weights
    (the shorter side resized, then the centre crop; no crop when ``resize_size`` is left out).
    """

    name = "torchvision"

    def detect(self, folder: Path, config: dict[str, Any] | None) -> bool:
        return (config or {}).get("library") == "torchvision"

    def load(self, folder: Path, name: str, classes: Classes) -> Student:
        from .models.base import KamalModel
        from .tasks.classification import ClassificationTask
        from .weights import load_weights

        config = json.loads((folder / "config.json").read_text())
        head = int(config.get("num_classes") or 0)
        labels = [str(n) for n in config.get("label_names") or []]
        indices, names, guessed = select_classes(folder, head, labels, classes)
        size = config.get("input_size") or [3, 224, 224]
        # torchvision's weights transforms: shorter side to resize_size, centre crop, on PIL
        resize_to = [config["resize_size"]] if config.get("resize_size") else []
        spec = check_input_spec(folder, size, config.get("mean") or (0.485, 0.456, 0.406),
                                config.get("std") or (0.229, 0.224, 0.225), "shorter", resize_to,
                                str(config.get("interpolation") or "bilinear"), "pil")
        task = ClassificationTask(name, names)
        task.guessed_names = guessed
        kwargs = {"model_name": str(config.get("architecture")), "num_classes": head,
                  "class_indices": indices}
        model = KamalModel("torchvision", [task], spec, kwargs)
        load_weights(model.net.model, folder / "model.safetensors",
                     f"torchvision '{config.get('architecture')}'")
        return model
