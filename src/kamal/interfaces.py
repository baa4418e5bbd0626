"""The contracts between kamal's core and its plugins: Task, Student, Teacher and the data
an Amalgamator (:mod:`kamal.amalgamator`) receives. Everything is re-exported from
:mod:`kamal`:

* a :class:`Task` says what one head predicts, how a student output is distilled from a
  teacher output, how predictions are scored, and how several teachers' tasks merge;
* a :class:`Student` is an ``nn.Module`` whose ``forward`` returns ``{task_name: output}``;
* a :class:`Teacher` is a frozen student (eval mode, no grad) with its provenance;
* an :class:`Amalgamator` is an algorithm: typed hyperparameters, the student it builds,
  the features it needs and its per-batch losses. The engine owns the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import KamalError

if TYPE_CHECKING:
    from .data.transforms import ImageView, ViewBatch


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: channels, spatial size, how an image is brought to that size
    (its eval transform), and the normalisation it applies itself.

    Images enter every kamal model as float tensors in [0, 1]; each model normalises with
    its own ``mean``/``std``. ``resize``, ``resize_to``, ``interpolation`` and ``backend``
    are the model's eval transform (:class:`~kamal.data.transforms.ImageView`): every model
    of a run reads each image through its own, so teachers trained at different
    resolutions, crops and normalisations amalgamate in one run.
    """

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: str = "shorter"
    resize_to: tuple[int, ...] = ()
    interpolation: str = "bilinear"
    backend: str = "tensor"

    @property
    def view(self) -> ImageView:
        """The eval transform as a hashable :class:`~kamal.data.transforms.ImageView`."""
        from .data.transforms import ImageView

        return ImageView(self.channels, (int(self.size[0]), int(self.size[1])), self.resize,
                         tuple(int(s) for s in self.resize_to), self.interpolation, self.backend)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``config.json``."""
        view = self.view
        return {"channels": self.channels, "size": list(self.size),
                "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "resize_to": list(view.resize_to), "interpolation": self.interpolation,
                "backend": self.backend}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict` (repos written before the transform fields read as
        the default transform)."""
        return cls(int(data["channels"]), tuple(data["size"]), tuple(data["mean"]),
                   tuple(data["std"]), str(data.get("resize", "shorter")),
                   tuple(int(s) for s in data.get("resize_to") or ()),
                   str(data.get("interpolation", "bilinear")), str(data.get("backend", "tensor")))


class Meter(ABC):
    """Accumulates predictions and targets over an evaluation pass."""

    @abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch (``target`` already mapped to the task's label space)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything added so far."""


class Task(ABC):
    """What one head of a model predicts and how it is compared.

    Subclasses set ``kind`` (the registered name), ``primary_metric`` and
    ``higher_is_better``, and implement the abstract methods. A task is plain data: it is
    saved in ``config.json`` through :meth:`to_dict` and rebuilt with :meth:`from_dict`.
    """

    name: str  # the head's name: the key of its output in a model's ``forward`` dict
    kind: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Output channels of a head for this task (classes, or 1 for depth)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description including ``name`` and ``kind``."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """Rebuild a task from :meth:`to_dict`'s output."""

    @abstractmethod
    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
        """Scalar loss pulling a student output toward a teacher output of this task."""

    @abstractmethod
    def new_meter(self) -> Meter:
        """A fresh :class:`Meter` for this task's metrics."""

    @classmethod
    @abstractmethod
    def merge(cls, tasks: Sequence[Task], name: str) -> Task:
        """The student's task covering all ``tasks`` (all of this kind)."""

    @abstractmethod
    def embed(self, teacher_task: Task, output: Tensor) -> Tensor:
        """Map a teacher's output for ``teacher_task`` into this (merged) task's space.

        For classification, logits go to the merged class positions; positions the teacher
        does not know are filled with ``-inf`` (callers mask or combine them).
        """

    def resize_output(self, output: Tensor, size: Sequence[int]) -> Tensor:
        """``output`` for an image of spatial ``size``: dense tasks resample their maps
        (a teacher reading another resolution than the student, or labels at the data's
        size); the default, for per-image outputs, returns it unchanged."""
        return output

    def map_targets(self, dataset_classes: Sequence[str] | None, targets: Tensor) -> Tensor:
        """Map dataset targets into this task's label space (-1 = not in this task)."""
        return targets

    def supervised_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar loss of ``output`` against ground truth already passed through
        :meth:`map_targets` (used by ``kamal train``). Tasks that cannot be trained with labels
        keep this default."""
        raise KamalError(f"task kind '{self.kind}' has no supervised loss; kamal train cannot "
                         "train it")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class Student(nn.Module, ABC):
    """A network whose ``forward(images)`` returns ``{task_name: output}``.

    ``images`` are float tensors in [0, 1] shaped like ``input_spec``. A student is saved as
    a model repo (``config.json`` + ``model.safetensors`` + ``README.md``) and can be the
    teacher of a later run. ``features`` is the root module whose named submodules are the
    feature layers (``feature_layers``) that algorithms tap.
    """

    tasks: list[Task]
    input_spec: InputSpec
    feature_layers: list[str]

    @property
    def features(self) -> nn.Module:
        """Module whose ``named_modules`` names are the tappable feature layers."""
        return self

    @abstractmethod
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Predict every task."""

    def config(self) -> dict[str, Any]:
        """The ``config.json`` content that rebuilds this network (without weights)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved as a model repo")


class Teacher:
    """A frozen, pretrained model with its tasks, input spec and provenance.

    Always in eval mode with gradients off; calling it runs inference. ``source`` records
    where it came from (``{"path": ...}`` or ``{"hub": ..., "revision": <sha>}``, plus the
    ``sha256`` of its weights). ``model`` is the frozen network (a :class:`Student`, so
    its ``features``, ``feature_layers`` and, for kamal models, ``head_layer`` are there to
    tap); ``name`` is the teacher's name in the run config.
    """

    name: str
    source: dict[str, Any]
    #: How to load this teacher's network again (set by kamal when it loaded the teacher from
    #: files): a teacher released with ``lazy=True`` loads its weights back through it the
    #: next time :attr:`model` is used.
    loader: Callable[[], nn.Module] | None

    def __init__(self, name: str, model: Student, source: dict[str, Any] | None = None) -> None:
        self.name = name
        self._model = model.eval().requires_grad_(False)
        self.source = dict(source or {})
        self.loader = None
        self._known: tuple[Tensor | ViewBatch, dict[str, Tensor]] | None = None
        self._released = False
        self._lazy = False

    @property
    def model(self) -> Student:
        """The frozen network (a teacher released with ``lazy=True`` loads its weights back
        first)."""
        self._load_if_lazy()
        return self._model

    @property
    def tasks(self) -> list[Task]:
        """The tasks this teacher is expert in."""
        return self._model.tasks

    @property
    def input_spec(self) -> InputSpec:
        """What the teacher expects as input."""
        return self._model.input_spec

    def to(self, device: torch.device | str) -> Teacher:
        """Move the weights (a released teacher's come back on ``device``); returns ``self``."""
        self._model.to(device)
        return self

    @torch.no_grad()  # as the TeacherRunner: outputs may enter autograd later without a copy
    def __call__(self, images: Tensor | ViewBatch) -> dict[str, Tensor]:
        """The frozen teacher's outputs, ``{task_name: output}``; no gradient is recorded.
        Given a :class:`~kamal.data.transforms.ViewBatch`, the teacher reads its own view."""
        from .data.transforms import model_input

        known = self._known
        if known is not None and known[0] is images:  # computed before (the teacher cache)
            return known[1]
        self.require_weights()
        return self.model(model_input(self.model, images))

    def require_weights(self) -> None:
        """Make sure the weights are there: a lazily released teacher loads them back; one
        released while the student trains from the cache is an error that says what to set."""
        if self._released and not self._lazy:
            raise KamalError(f"teacher '{self.name}' was released while the student trains from "
                             "the teacher cache; an algorithm that runs its teachers during "
                             "training needs train.release_teachers: false")
        self._load_if_lazy()

    def _load_if_lazy(self) -> None:
        if self._released and self._lazy:
            assert self.loader is not None
            self.restore(self.loader())

    @property
    def released(self) -> bool:
        """Whether the weights were freed (:meth:`release`) and not restored yet."""
        return self._released

    def release(self, lazy: bool = False) -> None:
        """Free the weights' memory, keeping the network's structure, tasks and input spec
        (the teacher cache holds what the teacher would compute); :meth:`restore` brings
        them back, or with ``lazy`` (and a :attr:`loader`) the next use of :attr:`model`
        does. Every parameter and buffer keeps its identity, so references held by others
        (feature taps) stay valid."""
        if lazy and self.loader is None:
            raise KamalError(f"teacher '{self.name}' has no loader to bring its weights back")
        for tensor in chain(self._model.parameters(), self._model.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self._released, self._lazy = True, lazy

    def restore(self, loaded: nn.Module) -> None:
        """Give the released weights back from ``loaded``, the same network loaded again."""
        theirs = dict(chain(loaded.named_parameters(remove_duplicate=False),
                            loaded.named_buffers(remove_duplicate=False)))
        for name, tensor in chain(self._model.named_parameters(remove_duplicate=False),
                                  self._model.named_buffers(remove_duplicate=False)):
            tensor.data = theirs[name].data.to(tensor.device)
        self._released = self._lazy = False

    def answer(self, images: Tensor | ViewBatch | None, outputs: dict[str, Tensor] | None) -> None:
        """Until called again, answer a call on exactly ``images`` (the same object) with
        ``outputs`` instead of running: the run's calibration reads the teacher cache this
        way. ``answer(None, None)`` stops it."""
        self._known = None if images is None or outputs is None else (images, outputs)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class Batch:
    """What an amalgamator sees for one step of training.

    ``teacher_features[i][layer]`` and ``student_features[layer]`` hold the layers that the
    amalgamator asked for in :meth:`Amalgamator.feature_layers`.
    """

    images: Tensor
    teacher_outputs: list[dict[str, Tensor]]
    student_outputs: dict[str, Tensor]
    teacher_features: list[dict[str, Tensor]] = field(default_factory=list)
    student_features: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class FeatureRequest:
    """Layers to capture: one list per teacher, and one for the student."""

    teachers: list[list[str]] = field(default_factory=list)
    student: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StudentSpec:
    """The ``student`` section of a run config."""

    architecture: str
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    task_names: dict[str, str] = field(default_factory=dict)
    # what the student reads (the run resolves ``student.input``); None: the teachers' input
    # when they all read images the same way
    input_spec: InputSpec | None = None
