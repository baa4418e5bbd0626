"""kamal: knowledge amalgamation, merging several teacher networks into one student.

Everything a plugin may import is listed in ``__all__``, plus the module ``kamal.testing``
(the conformance kit for plugin tests); other modules are private.
Attributes load lazily so that ``import kamal`` (and ``kamal --help``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import CORE_DISTRIBUTION, PLUGIN_API, core_version

__version__ = core_version()

# public name -> module that defines it
_EXPORTS = {
    # interfaces
    "Task": "kamal.interfaces",
    "Meter": "kamal.interfaces",
    "Student": "kamal.interfaces",
    "Teacher": "kamal.interfaces",
    "Amalgamator": "kamal.amalgamator",
    "AmalgamatorConfig": "kamal.amalgamator",
    "Batch": "kamal.interfaces",
    "FeatureRequest": "kamal.interfaces",
    "InputSpec": "kamal.interfaces",
    "StudentSpec": "kamal.interfaces",
    # plugin hooks and registry
    "hookimpl": "kamal.hookspecs",
    "Register": "kamal.hookspecs",
    "get_registry": "kamal.plugins",
    "TeacherFormat": "kamal.formats",
    "plugin_infos": "kamal.plugins",
    # building blocks for algorithms
    "Architecture": "kamal.models.base",
    "KamalModel": "kamal.models.base",
    "merge_tasks": "kamal.models.base",
    "student_input_spec": "kamal.models.base",
    "FeatureTap": "kamal.features",
    "LogitMerger": "kamal.merging",
    "KDTerm": "kamal.distillation",
    "KDTermConfig": "kamal.distillation",
    "ClassificationTask": "kamal.tasks.classification",
    "SegmentationTask": "kamal.tasks.dense",
    "DepthTask": "kamal.tasks.dense",
    "SegNet": "kamal.models.segnet",
    "PairedDataset": "kamal.data.paired",
    "PairedTransform": "kamal.data.paired",
    "ImageDataset": "kamal.data.base",
    "TensorImageDataset": "kamal.data.base",
    "build_dataset": "kamal.data.base",
    "build_batch": "kamal.step",
    "ImageView": "kamal.data.transforms",
    "ViewBatch": "kamal.data.transforms",
    "Trainer": "kamal.engine",
    "StepInfo": "kamal.engine",
    "Logger": "kamal.loggers",
    # distributed runs (no-ops in one process)
    "is_main_process": "kamal.distributed",
    "broadcast_object": "kamal.distributed",
    "DistributedError": "kamal.distributed",
    # model repos
    "load_model": "kamal.repo",
    "load_teacher": "kamal.repo",
    "save_model_repo": "kamal.repo",
    "load_from_hub": "kamal.hub_commands",
    # running
    "amalgamate": "kamal.run",
    "train": "kamal.supervised",
    "evaluate_repo": "kamal.model_eval",
    # errors
    "KamalError": "kamal.errors",
    "ConfigError": "kamal.errors",
    "ModelRepoError": "kamal.errors",
    "RegistryError": "kamal.errors",
    "NonFiniteLossError": "kamal.errors",
    "Interrupted": "kamal.errors",
}

__all__ = ["__version__", "CORE_DISTRIBUTION", "PLUGIN_API", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kamal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static analysers see the real names
    from .amalgamator import Amalgamator, AmalgamatorConfig
    from .data.base import ImageDataset, TensorImageDataset, build_dataset
    from .data.paired import PairedDataset, PairedTransform
    from .distillation import KDTerm, KDTermConfig
    from .distributed import DistributedError, broadcast_object, is_main_process
    from .engine import StepInfo, Trainer
    from .errors import (
        ConfigError,
        Interrupted,
        KamalError,
        ModelRepoError,
        NonFiniteLossError,
        RegistryError,
    )
    from .features import FeatureTap
    from .formats import TeacherFormat
    from .hookspecs import Register, hookimpl
    from .hub_commands import load_from_hub
    from .interfaces import (
        Batch,
        FeatureRequest,
        InputSpec,
        Meter,
        Student,
        StudentSpec,
        Task,
        Teacher,
    )
    from .loggers import Logger
    from .merging import LogitMerger
    from .model_eval import evaluate_repo
    from .models.base import Architecture, KamalModel, merge_tasks
    from .models.segnet import SegNet
    from .plugins import get_registry, plugin_infos
    from .repo import load_model, load_teacher, save_model_repo
    from .run import amalgamate
    from .step import build_batch
    from .supervised import train
    from .tasks.classification import ClassificationTask
    from .tasks.dense import DepthTask, SegmentationTask
