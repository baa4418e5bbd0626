"""Running the frozen teachers of an amalgamation step, as fast as the device allows.

Teachers that are the same network up to their weights (architecture and its options,
tasks' output sizes, input spec, requested feature layers, every parameter's and buffer's
shape and dtype) can run as **one call**: their weights are stacked with
``torch.func.stack_module_state`` and the model is ``vmap``-ped over them with
``functional_call``. The :class:`~kamal.features.FeatureTap` sits inside the vmapped
function and its features are returned from it, so they come out stacked like the outputs.
Every other teacher runs back to back, with its feature layers resolved once rather than on
every step. Teachers with 2-d convolutions can run **channels-last** (a private
channels-last copy of the weights; the teacher itself is left as it is).

Both are ``auto`` by default and turn on only where they were measured faster
(docs/benchmarks.md, "Teacher execution"): on a CPU, vmapped teachers are *slower* than
back to back (grouped convolutions), so ``auto`` leaves them off; channels-last teachers are
faster, so ``auto`` turns it on there. ``on`` forces either (for devices not measured yet).

A vmapped group is checked once against the teachers run one by one on its first batch;
if it cannot be vmapped or disagrees, it falls back to back-to-back, logged once.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .data.transforms import ViewBatch, model_input
from .features import FeatureTap
from .interfaces import Teacher

log = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]
TeacherOutputs = tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]

# Device types where ``auto`` turns each technique on: only where it was measured faster
# than the plain path (figures and commands in docs/benchmarks.md).
# vmapped same-architecture teachers: slower on CPU (ResNet-18 and small-cnn); CUDA not measured.
BATCHED_FASTER_ON: frozenset[str] = frozenset()
# channels-last conv teachers: faster on CPU; CUDA (fp32) not measured.
CHANNELS_LAST_FASTER_ON: frozenset[str] = frozenset({"cpu"})


def resolve_switch(value: Switch, device: torch.device, faster_on: frozenset[str]) -> bool:
    """``on``/``off`` as given; ``auto`` is on where the device type was measured faster."""
    if value == "auto":
        return device.type in faster_on
    return value == "on"


def group_key(teacher: Teacher, layers: Sequence[str]) -> tuple[Any, ...] | None:
    """What must match for teachers to run as one vmapped call (``None``: never batched)."""
    model = teacher.model
    architecture = getattr(model, "architecture", None)
    spec = getattr(model, "input_spec", None)
    if architecture is None or spec is None:
        return None
    try:
        kwargs = json.dumps(getattr(model, "architecture_kwargs", {}), sort_keys=True)
    except TypeError:
        return None
    tasks = tuple((type(t).__qualname__, t.kind, t.num_outputs) for t in model.tasks)
    state = tuple((name, tuple(value.shape), value.dtype, value.device)
                  for name, value in chain(model.named_parameters(), model.named_buffers()))
    return (architecture, kwargs, tasks, spec.view, tuple(spec.mean), tuple(spec.std),
            tuple(layers), state)


def has_conv2d(model: nn.Module) -> bool:
    """Whether channels-last can matter for ``model``."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class _Single:
    """One teacher, its feature layers resolved once."""

    def __init__(self, index: int, teacher: Teacher, layers: Sequence[str],
                 channels_last: bool, in_place: bool = False) -> None:
        self.index = index
        self.teacher = teacher
        self.model = teacher.model
        self.channels_last = channels_last
        if channels_last:  # a private copy: the teacher stays as evaluation and plugins expect
            model = self.model if in_place else copy.deepcopy(self.model)
            self.model = model.to(memory_format=torch.channels_last)
        self.tap = FeatureTap(self.model.features, layers, teacher.name)

    def run(self, images: Tensor | ViewBatch, outputs: list[Any], features: list[Any]) -> None:
        images = model_input(self.teacher.model, images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.tap as tap:
            out = self.model(images)
        outputs[self.index] = _contiguous(out)
        features[self.index] = _contiguous(tap.features)


class _Group:
    """Same-architecture teachers as one ``vmap`` over their stacked weights."""

    def __init__(self, indices: list[int], teachers: Sequence[Teacher],
                 layers: Sequence[str]) -> None:
        from torch.func import functional_call, stack_module_state

        self.indices = indices
        self.teachers = [teachers[i] for i in indices]
        self.template = self.teachers[0].model
        self.params, self.buffers = stack_module_state([t.model for t in self.teachers])
        tap = FeatureTap(self.template.features, layers, self.teachers[0].name)
        # the template's task names key the vmapped outputs; each teacher has its own names
        self.task_names = [[task.name for task in t.tasks] for t in self.teachers]
        template_names = self.task_names[0]

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor):
            with tap:
                out = functional_call(self.template, (params, buffers), (images,))
            return [out[name] for name in template_names], dict(tap.features)

        self.call = torch.func.vmap(one, in_dims=(0, 0, None))
        self.checked = False

    def run(self, images: Tensor | ViewBatch, outputs: list[Any], features: list[Any]) -> None:
        images = model_input(self.template, images)
        stacked_out, stacked_feat = self.call(self.params, self.buffers, images)
        for j, index in enumerate(self.indices):
            outputs[index] = {name: value[j] for name, value in
                              zip(self.task_names[j], stacked_out, strict=True)}
            features[index] = {layer: value[j] for layer, value in stacked_feat.items()}

    def names(self) -> list[str]:
        return [t.name for t in self.teachers]


class TeacherRunner:
    """Outputs and requested features of every teacher for a batch of images.

    Each teacher reads its own view of a :class:`~kamal.data.transforms.ViewBatch`; with
    ``output_size`` (the student's input size), dense outputs (segmentation logits, depth
    maps) are resized to it, so teachers at other resolutions give the student's maps.
    ``batch`` and ``channels_last`` are ``auto``/``on``/``off`` (see the module docstring);
    they are resolved on the first call, for the device of the images. Channels-last
    teachers run as private copies, or converted in place with ``in_place`` (for teachers
    released once they have run: the cache fill holds one copy of the weights, not two).
    """

    def __init__(self, teachers: Sequence[Teacher], layers: Sequence[Sequence[str]],
                 batch: Switch = "auto", channels_last: Switch = "auto",
                 output_size: Sequence[int] | None = None, in_place: bool = False) -> None:
        self.teachers = list(teachers)
        self.in_place = in_place
        self.output_size = tuple(output_size) if output_size is not None else None
        self.layers = [list(x) for x in layers]
        self.batch = batch
        self.channels_last = channels_last
        self.device: torch.device | None = None
        self.use_channels_last = False
        self.units: list[_Single | _Group] = []

    @torch.no_grad()  # not inference_mode: outputs join the student's graph without a copy
    def __call__(self, images: Tensor | ViewBatch) -> TeacherOutputs:
        if any(teacher.released for teacher in self.teachers):
            self.reset()  # the plan's networks (and copies) lost their weights
            for teacher in self.teachers:
                teacher.require_weights()
        device = model_input(self.teachers[0].model, images).device
        if self.device != device:
            self._plan(device)
        outputs: list[Any] = [None] * len(self.teachers)
        features: list[Any] = [None] * len(self.teachers)
        for unit in list(self.units):
            if isinstance(unit, _Group) and not unit.checked:
                self._run_checked(unit, images, outputs, features)
            else:
                unit.run(images, outputs, features)
        if self.output_size is not None:
            outputs = [self._resized(teacher, out) for teacher, out in zip(self.teachers, outputs,
                                                                            strict=True)]
        return outputs, features

    def _resized(self, teacher: Teacher, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.output_size is not None
        tasks = {task.name: task for task in teacher.tasks}
        return {name: tasks[name].resize_output(value, self.output_size) if name in tasks
                else value for name, value in outputs.items()}

    def reset(self) -> None:
        """Drop the plan and its private copies of weights (channels-last, stacked); the
        next call plans again (:meth:`describe` still tells the last plan)."""
        self.described = self.describe()
        self.device, self.units = None, []

    def describe(self) -> dict[str, Any]:
        """How the teachers run (after the first call): vmapped groups, channels-last ones."""
        if not self.units and getattr(self, "described", None):
            return self.described
        return {"batched_groups": [u.names() for u in self.units if isinstance(u, _Group)],
                "channels_last": [u.teacher.name for u in self.units
                                  if isinstance(u, _Single) and u.channels_last]}

    # --- planning ------------------------------------------------------------------------

    def _plan(self, device: torch.device) -> None:
        self.device = device
        batch = resolve_switch(self.batch, device, BATCHED_FASTER_ON)
        channels_last = resolve_switch(self.channels_last, device, CHANNELS_LAST_FASTER_ON)
        self.use_channels_last = channels_last
        groups: dict[tuple[Any, ...], list[int]] = {}
        singles: list[int] = []
        for i, (teacher, layers) in enumerate(zip(self.teachers, self.layers, strict=True)):
            key = group_key(teacher, layers) if batch else None
            if key is None:
                singles.append(i)
            else:
                groups.setdefault(key, []).append(i)
        units: list[_Single | _Group] = []
        for indices in groups.values():
            if len(indices) == 1:
                singles += indices
                continue
            try:
                units.append(_Group(indices, self.teachers, self.layers[indices[0]]))
            except Exception as exc:  # noqa: BLE001 - any failure: run them one by one
                self._fall_back(indices, f"{type(exc).__name__}: {exc}")
                singles += indices
        for i in sorted(singles):
            teacher = self.teachers[i]
            units.append(_Single(i, teacher, self.layers[i],
                                 channels_last and has_conv2d(teacher.model), self.in_place))
        self.units = units

    def _run_checked(self, group: _Group, images: Tensor | ViewBatch, outputs: list[Any],
                     features: list[Any]) -> None:
        """First batch of a group: vmapped and one by one must agree, else fall back."""
        singles = [_Single(i, self.teachers[i], self.layers[i], False) for i in group.indices]
        for single in singles:
            single.run(images, outputs, features)
        batched_out: list[Any] = [None] * len(self.teachers)
        batched_feat: list[Any] = [None] * len(self.teachers)
        try:
            group.run(images, batched_out, batched_feat)
            problem = _mismatch([(outputs[i], batched_out[i]) for i in group.indices]
                                + [(features[i], batched_feat[i]) for i in group.indices])
        except Exception as exc:  # noqa: BLE001 - an architecture vmap cannot handle
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            group.checked = True
            return
        self._fall_back(group.indices, problem)
        self.units.remove(group)
        self.units += [_Single(i, self.teachers[i], self.layers[i],
                               self.use_channels_last and has_conv2d(self.teachers[i].model))
                       for i in group.indices]

    def _fall_back(self, indices: list[int], reason: str) -> None:
        names = ", ".join(self.teachers[i].name for i in indices)
        log.warning("teachers %s cannot run as one batched call (%s); running them one by one",
                    names, reason.splitlines()[0][:300])


def _contiguous(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Plain row-major tensors for the algorithms (channels-last outputs are not ``view``-able)."""
    return {k: v.contiguous() for k, v in values.items()}


def _mismatch(pairs: list[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> str | None:
    for reference, batched in pairs:
        if reference.keys() != batched.keys():
            return f"different keys {sorted(reference)} vs {sorted(batched)}"
        for key, value in reference.items():
            other = batched[key]
            scale = float(value.abs().max()) if value.numel() else 0.0
            if other.shape != value.shape or not torch.allclose(
                    value, other, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
                return f"'{key}' differs from the one-by-one result"
    return None
