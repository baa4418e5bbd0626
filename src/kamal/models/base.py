"""``KamalModel``: a registered architecture + its tasks + input normalisation.

Teachers and students are both ``KamalModel``s, so a student can be the next run's teacher
and both are saved in the same model-repo layout.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.transforms import DENSE_KINDS, ViewBatch, model_input, view_problem
from ..errors import ConfigError, KamalError, ModelRepoError
from ..interfaces import InputSpec, Student, StudentSpec, Task, Teacher
from ..plugins import get_registry


@dataclass(frozen=True)
class Architecture:
    """A registered network builder with its named feature layers.

    ``build(num_outputs=..., in_channels=..., **kwargs)`` returns an ``nn.Module`` whose
    forward gives one output tensor; with ``multi_task=True`` it is called as
    ``build(tasks=..., in_channels=..., **kwargs)`` and must return ``{task_name: output}``.
    ``feature_layers`` are ``named_modules`` names, shallow to deep; ``head`` is the final
    classifier, whose *input* is the pooled feature (the default layer for feature-based
    algorithms).
    """

    build: Callable[..., nn.Module]
    feature_layers: tuple[str, ...]
    head: str | None = None
    multi_task: bool = False
    description: str = ""


def head_removed(net: nn.Module) -> bool:
    """Whether a wrapper network's classifier (its ``head_layer``) was replaced by an
    identity: then it outputs features, and no class selection applies (recombination
    splices the teachers' classifiers into one head this way)."""
    head = getattr(net, "head_layer", None)
    return head is not None and isinstance(net.get_submodule(head), nn.Identity)


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a task from ``config.json`` through the task registry."""
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ModelRepoError(f"task {data!r} has no 'kind'")
    task_cls = get_registry().get("tasks", kind)
    return task_cls.from_dict(data)


def _call_builder(name: str, arch: Architecture, kwargs: dict[str, Any], **fixed: Any) -> nn.Module:
    params = inspect.signature(arch.build).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    allowed = [k for k, p in params.items() if k not in fixed and p.kind not in variadic]
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        raise ConfigError(f"architecture '{name}' has no option {unknown[0]!r}; "
                          f"its options are: {', '.join(allowed) or 'none'}")
    try:
        return arch.build(**fixed, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"architecture '{name}' cannot be built with {kwargs}: {exc}") from exc


class KamalModel(Student):
    """A student or teacher network built from a registered architecture.

    ``architecture`` and ``architecture_kwargs`` rebuild it (they are saved in
    ``config.json``); ``head_layer`` names the module that produces the task outputs (its
    ``":in"`` is the pooled feature a classifier reads).
    """

    architecture: str
    architecture_kwargs: dict[str, Any]
    head_layer: str

    def __init__(self, architecture: str, tasks: Sequence[Task], input_spec: InputSpec,
                 architecture_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        arch = get_registry().get("architectures", architecture)
        self.architecture = architecture
        self.architecture_kwargs = dict(architecture_kwargs or {})
        self.tasks = list(tasks)
        self.input_spec = input_spec
        self.feature_layers = list(arch.feature_layers)
        self.head_layer = arch.head
        if arch.multi_task:
            self.net = _call_builder(architecture, arch, self.architecture_kwargs,
                                     tasks=self.tasks, in_channels=input_spec.channels)
        else:
            if len(self.tasks) != 1:
                raise ConfigError(f"architecture '{architecture}' has a single head but the "
                                  f"model needs {len(self.tasks)} tasks; use a multi-task "
                                  "architecture")
            self.net = _call_builder(architecture, arch, self.architecture_kwargs,
                                     num_outputs=self.tasks[0].num_outputs,
                                     in_channels=input_spec.channels)
        # architectures whose layers depend on the model built (timm) name them on the network
        self.head_layer = self.head_layer or getattr(self.net, "head_layer", None)
        self.feature_layers = self.feature_layers or list(getattr(self.net, "feature_layers", []))
        register_normalisation(self, input_spec)

    @property
    def features(self) -> nn.Module:
        return self.net

    def forward(self, images: Tensor | ViewBatch) -> dict[str, Tensor]:
        images = model_input(self, images)
        out = self.net((images - self.mean) / self.std)
        if isinstance(out, Tensor):
            return {self.tasks[0].name: out}
        return out

    def config(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "kamal_version": __version__,
            "architecture": self.architecture,
            "architecture_kwargs": self.architecture_kwargs,
            "tasks": [t.to_dict() for t in self.tasks],
            "input": self.input_spec.to_dict(),
            "feature_layers": self.feature_layers,
        }


def register_normalisation(module: nn.Module, spec: InputSpec) -> None:
    """Give ``module`` the non-persistent buffers ``mean`` and ``std`` (1, C, 1, 1) of
    ``spec``: models take images in [0, 1] and normalise them themselves."""
    mean = torch.tensor(_per_channel(spec.mean, spec.channels)).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(spec.std, spec.channels)).view(1, -1, 1, 1)
    module.register_buffer("mean", mean, persistent=False)
    module.register_buffer("std", std, persistent=False)


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ModelRepoError(f"input normalisation has {len(values)} values for {channels} channels")
    return values


def merge_tasks(teachers: Sequence[Teacher], task_names: dict[str, str] | None = None) -> list[Task]:
    """The student's tasks: the teachers' tasks merged per kind, in order of first appearance.

    A merged task keeps the teacher task's name when all teachers' tasks of that kind share
    it; ``task_names`` (``{kind: name}``) overrides; otherwise it is named after the kind.
    """
    task_names = task_names or {}
    by_kind: dict[str, list[Task]] = {}
    for teacher in teachers:
        for task in teacher.tasks:
            by_kind.setdefault(task.kind, []).append(task)
    merged = []
    for kind, tasks in by_kind.items():
        names = {t.name for t in tasks}
        name = task_names.get(kind) or (names.pop() if len(names) == 1 else kind)
        merged.append(type(tasks[0]).merge(tasks, name))
    return merged


def merged_only(tasks: Sequence[Task], teachers: Sequence[Teacher]) -> list[Task]:
    """The student ``tasks`` that merge teachers' tasks: a task that is exactly one teacher's
    own (an algorithm that keeps each teacher's head, such as agglomerate) merges nothing."""
    own = [task.to_dict() for teacher in teachers for task in teacher.tasks]
    return [task for task in tasks if task.to_dict() not in own]


def check_class_names(teachers: Sequence[Teacher]) -> None:
    """Refuse to merge a teacher whose class names were guessed (output indices) with other
    teachers of the same task kind: equal made-up names would average unrelated outputs."""
    from ..tasks.classification import NamedClassesTask

    by_kind: dict[str, list[tuple[int, Teacher, NamedClassesTask]]] = {}
    for i, teacher in enumerate(teachers):
        for task in teacher.tasks:
            if isinstance(task, NamedClassesTask):
                by_kind.setdefault(task.kind, []).append((i, teacher, task))
    for kind, entries in by_kind.items():
        guessed = [entry for entry in entries if entry[2].guessed_names]
        if len(entries) < 2 or not guessed:
            continue
        i, teacher, numbered = guessed[0]
        listing = "; ".join(f"'{t.name}': {', '.join(task.classes[:8])}"
                            f"{', ...' if len(task.classes) > 8 else ''}" for _, t, task in entries)
        raise ConfigError(
            f"teachers.{i}: '{teacher.name}' has no {kind} class names in its repo, so its "
            f"classes were numbered 0..{len(numbered.classes) - 1}; merged with the other teachers by "
            "those numbers they would mix unrelated classes. Name them with classes: [...] (or "
            f"{{index: name}}) in teachers.{i}. The teachers' classes now: {listing}")


def student_input_spec(teachers: Sequence[Teacher],
                       given: dict[str, Any] | None = None) -> InputSpec:
    """The student's input: ``given`` (``student.input`` of the run config) over defaults
    that do not depend on the teachers' order.

    The teachers must agree on channels. Size and transform: the teachers' when they all
    read images the same way, else the largest teacher size with kamal's default transform
    (the shorter side resized, the centre kept, bilinear), squashed instead when every
    teacher with dense outputs squashes (so the maps line up). Mean/std: the teachers' when
    they agree, else their per-channel average.
    """
    specs = [t.input_spec for t in teachers]
    channels = {s.channels for s in specs}
    if len(channels) > 1:
        listing = ", ".join(f"'{t.name}' {t.input_spec.channels}" for t in teachers)
        raise KamalError(f"teachers disagree on image channels ({listing}); amalgamated "
                         "teachers must read the same kind of image (all RGB or all grey)")
    first = specs[0]
    given = {k: v for k, v in (given or {}).items() if v is not None}
    same_view = all(s.view == first.view for s in specs)
    if same_view and "size" not in given:
        base = {"size": tuple(first.size), "resize": first.resize, "resize_to": first.resize_to,
                "interpolation": first.interpolation, "backend": first.backend}
    else:
        base = {"size": max((tuple(s.size) for s in specs), key=lambda hw: (hw[0] * hw[1], hw))}
        if _dense_teachers_squash(teachers):  # their maps cover the whole image: so must ours
            base["resize"] = "squash"
    base.update({"mean": _agreed(specs, "mean"), "std": _agreed(specs, "std")})
    base.update(given)
    side = base["size"]
    hw = (int(side), int(side)) if isinstance(side, int) else tuple(int(v) for v in side)
    crop_pct = base.pop("crop_pct", None)
    if crop_pct is not None and not base.get("resize_to"):
        scaled = (math.floor(hw[0] / crop_pct), math.floor(hw[1] / crop_pct))
        base["resize_to"] = scaled[:1] if base.get("resize", "shorter") == "shorter" else scaled
    spec = InputSpec(first.channels, hw, tuple(base["mean"]), tuple(base["std"]),
                     base.get("resize", "shorter"), tuple(base.get("resize_to") or ()),
                     base.get("interpolation", "bilinear"), base.get("backend", "tensor"))
    problem = view_problem(spec.channels, spec.size, spec.resize, spec.resize_to,
                           spec.interpolation, spec.backend)
    try:
        _per_channel(spec.mean, spec.channels)
        _per_channel(spec.std, spec.channels)
    except ModelRepoError as exc:
        problem = problem or str(exc)
    if problem:
        raise ConfigError(f"student.input: {problem}")
    return spec


def _dense_teachers_squash(teachers: Sequence[Teacher]) -> bool:
    """Whether the teachers with dense tasks all squash the whole image (no crop)."""
    views = [t.input_spec.view for t in teachers
             if any(task.kind in DENSE_KINDS for task in t.tasks)]
    return bool(views) and all(v.resize == "squash" and tuple(v.resize_to) == tuple(v.size)
                               for v in views)


def _agreed(specs: Sequence[InputSpec], field: str) -> tuple[float, ...]:
    """The specs' ``mean`` or ``std`` when equal, else their per-channel average."""
    values = [tuple(getattr(s, field)) for s in specs]
    if len(set(values)) == 1:
        return values[0]
    rows = [_per_channel(v, specs[0].channels) for v in values]
    return tuple(round(sum(column) / len(rows), 6) for column in zip(*rows, strict=True))


def build_student_for(spec: StudentSpec, teachers: Sequence[Teacher]) -> KamalModel:
    """Build ``spec``'s architecture with the teachers' merged tasks and the spec's input
    (default: :func:`student_input_spec` of the teachers)."""
    return KamalModel(spec.architecture, merge_tasks(teachers, spec.task_names),
                      spec.input_spec or student_input_spec(teachers), spec.architecture_kwargs)
