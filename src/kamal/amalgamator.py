"""The algorithm contract for plugins: :class:`Amalgamator` and its typed
:class:`AmalgamatorConfig` (re-exported from :mod:`kamal`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from .errors import ConfigError
from .interfaces import Batch, FeatureRequest, Student, StudentSpec, Teacher
from .models.base import build_student_for

if TYPE_CHECKING:
    from .engine import Trainer


class AmalgamatorConfig(BaseModel):
    """Hyperparameters of an algorithm. Subclass it; unknown keys are rejected.

    Every field needs a default (the paper's setting) and a ``description``: both appear in
    the configuration reference and in error messages.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str


class Amalgamator(ABC):
    """An amalgamation algorithm (contract for plugins).

    Life cycle, driven by :func:`kamal.run.amalgamate`:

    1. ``check_teachers(teachers)`` (classmethod): refuse teachers the algorithm cannot use,
       with a message saying which algorithm would work.
    2. ``__init__(config, teachers, student_spec)``.
    3. ``build_student()``: the student network (default: ``student_spec``'s architecture
       with the teachers' merged tasks).
    4. ``setup(student, transfer_images)``: build trainable blocks, calibrate on unlabeled
       data (one pass, no labels). The batches are tensors, or ``ViewBatch`` es for an
       algorithm with ``mixed_views`` whose teachers read images differently.
    5. ``amalgamate(trainer)``: by default ``trainer.fit()``, which calls :meth:`losses` for
       every batch and optimises the student plus :meth:`trainable_modules`. Algorithms with
       several stages call ``trainer.fit(stage=..., parameters=...)`` several times.
    """

    name: ClassVar[str]
    Config: ClassVar[type[AmalgamatorConfig]] = AmalgamatorConfig
    # True: teachers may read images differently from the student (their own size, crop,
    # resampling); ``setup`` then receives :class:`~kamal.data.transforms.ViewBatch` es where
    # they do, and the algorithm compares teachers and student only where that is meaningful
    # (outputs the tasks align, features it resizes itself). False: the run refuses such
    # teachers, naming them.
    mixed_views: ClassVar[bool] = False
    # True: teachers without a task (backbones, e.g. a transformers ``Dinov2Model``) are
    # welcome; their tapped layers are all they give. False: the run refuses them.
    backbone_teachers: ClassVar[bool] = False

    def __init__(self, config: AmalgamatorConfig, teachers: list[Teacher],
                 student_spec: StudentSpec) -> None:
        self.config = config
        self.teachers = teachers
        self.student_spec = student_spec
        self.student: Student | None = None

    @classmethod
    def check_teachers(cls, teachers: Sequence[Teacher]) -> None:
        """Raise :class:`kamal.KamalError` if this algorithm cannot amalgamate ``teachers``."""

    def build_student(self) -> Student:
        """Build the student; the default merges the teachers' tasks onto the spec's network."""
        return build_student_for(self.student_spec, self.teachers)

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        """Prepare for training (build blocks, calibrate). ``transfer_images`` is unlabeled."""
        self.student = student

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Extra modules trained with the student (checkpointed with it)."""
        return {}

    def feature_layers(self) -> FeatureRequest:
        """Layers of the teachers and the student that :meth:`losses` needs."""
        return FeatureRequest()

    def student_images(self, images: Tensor, step: int) -> Tensor:
        """The images the student reads at global step ``step`` (its view of the batch);
        the default leaves them as they are. An algorithm may resize them, e.g. to train
        the student at several resolutions while the teachers keep their own."""
        return images

    @abstractmethod
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Named scalar losses for one batch; the engine sums them (already weighted)."""

    def amalgamate(self, trainer: Trainer) -> None:
        """Run the training; override for multi-stage algorithms."""
        trainer.fit()

    def describe(self) -> dict[str, Any]:
        """Algorithm name and hyperparameters, for the report and the model card."""
        return self.config.model_dump()

    def measurements(self) -> dict[str, Any]:
        """What the algorithm measured during the run (JSON values), kept in report.json
        under ``measurements``; the default has none."""
        return {}


def algorithms_with(flag: str) -> list[str]:
    """Installed algorithms whose class sets ``flag`` (for a suggestion in an error)."""
    from .plugins import get_registry

    registry, names = get_registry(), []
    for name in registry.names("amalgamators"):
        try:
            if getattr(registry.get("amalgamators", name), flag, False):
                names.append(name)
        except Exception:  # noqa: BLE001 - a plugin that fails to load is no suggestion
            continue
    return names


def check_backbone_teachers(cls: type[Amalgamator], teachers: Sequence[Teacher]) -> None:
    """Teachers without a task (backbones) need an algorithm that distils features."""
    for i, teacher in enumerate(teachers):
        if not teacher.tasks and not cls.backbone_teachers:
            others = ", ".join(algorithms_with("backbone_teachers")) or "none installed"
            raise ConfigError(
                f"teachers.{i}: '{teacher.name}' is a backbone without a task head, and "
                f"algorithm '{cls.name}' distils task outputs; use an algorithm that distils "
                f"features ({others}) or a repo with a head")
