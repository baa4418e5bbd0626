"""Combine: same-architecture teachers -> one ``recombined`` student, exact before training.

Each teacher's network (without its classifier) is copied into a branch; its classifier's
rows go to the merged head at the positions of its classes in the merged task. A class that
several teachers share gets the mean of their logits (as the ``naive`` logit merge does);
with disjoint classes the student's logits are exactly the teachers' logits, side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from kamal import ClassificationTask, InputSpec, KamalError, KamalModel, Teacher, get_registry, merge_tasks

from .network import NAME, RecombinedNet, classifier_name, head_of


def check_combinable(teachers: Sequence[Teacher]) -> None:
    """Raise :class:`kamal.KamalError` unless the teachers can be combined layer by layer."""
    if len(teachers) < 2:
        raise KamalError("recombination needs at least two teachers to combine")
    archs = {t.name: getattr(t.model, "architecture", None) for t in teachers}
    if None in archs.values():
        raise KamalError("recombination needs teachers loaded from kamal model repos "
                         "(a registered architecture in config.json)")
    if len(set(archs.values())) > 1:
        listed = ", ".join(f"'{name}' is {arch}" for name, arch in archs.items())
        raise KamalError(
            f"recombination merges teachers layer by layer, so they must share one architecture, "
            f"but {listed}. For teachers of different architectures use algorithm.name: cfl "
            "(common feature learning, kamal-plugin-cfl) or kd.")
    arch_name = next(iter(archs.values()))
    if arch_name == NAME:
        raise KamalError("teachers that are themselves recombined networks cannot be recombined "
                         "again; combine their original teachers instead")
    if get_registry().get("architectures", arch_name).multi_task:
        raise KamalError(f"recombination needs single-head teachers; '{arch_name}' is multi-task")
    for teacher in teachers:
        kinds = [t.kind for t in teacher.tasks]
        if kinds != ["classification"]:
            raise KamalError(f"teacher '{teacher.name}' has tasks {kinds}; recombination merges "
                             "classification heads (one classification task per teacher)")
    first = teachers[0].input_spec.view
    for teacher in teachers[1:]:
        view = teacher.input_spec.view
        if view != first:
            raise KamalError(
                f"teachers disagree on their input: '{teachers[0].name}' reads "
                f"{first.describe()}, '{teacher.name}' reads {view.describe()}. Combined "
                "teachers must read the same images; kd and cfl take each teacher at its own "
                "resolution.")


def _input_specs(teachers: Sequence[Teacher]) -> tuple[InputSpec, list[dict[str, Any]]]:
    """The student's input spec and, if the teachers normalise differently, each branch's."""
    specs = [t.input_spec for t in teachers]
    if all((s.mean, s.std) == (specs[0].mean, specs[0].std) for s in specs):
        return specs[0], [{} for _ in specs]
    # the student passes images through; every branch applies its teacher's normalisation
    plain = dataclasses.replace(specs[0], mean=(0.0,), std=(1.0,))
    return plain, [{"mean": list(s.mean), "std": list(s.std)} for s in specs]


@torch.no_grad()
def combine(teachers: Sequence[Teacher], task_names: dict[str, str] | None = None) -> KamalModel:
    """The ``recombined`` student holding every teacher's weights (on the CPU)."""
    check_combinable(teachers)
    tasks = merge_tasks(teachers, task_names)
    merged = tasks[0]
    assert isinstance(merged, ClassificationTask)
    spec, norms = _input_specs(teachers)
    arch_name = teachers[0].model.architecture  # type: ignore[attr-defined]
    arch = get_registry().get("architectures", arch_name)
    branches = [{"base_kwargs": dict(t.model.architecture_kwargs),  # type: ignore[attr-defined]
                 "num_outputs": t.tasks[0].num_outputs, **norm}
                for t, norm in zip(teachers, norms, strict=True)]
    student = KamalModel(NAME, tasks, spec, {"base": arch_name, "branches": branches})
    net = student.net
    assert isinstance(net, RecombinedNet)

    # how many teachers predict each merged class: shared classes get the mean of their logits
    sharing = torch.zeros(merged.num_outputs)
    for teacher in teachers:
        sharing[merged.positions(teacher.tasks[0])] += 1  # type: ignore[arg-type]
    state: dict[str, torch.Tensor] = {}
    for i, teacher in enumerate(teachers):
        teacher_net = teacher.model.features
        classifier = classifier_name(teacher_net, head_of(teacher_net, arch))
        for key, value in teacher_net.state_dict().items():
            if not key.startswith(classifier + "."):
                state[f"branches.{i}.{key}"] = value.detach().cpu()
        linear = teacher_net.get_submodule(classifier)
        # a wrapped library classifier keeps its whole head and selects the task's rows
        chosen = getattr(teacher_net, "class_indices", None) or list(range(linear.out_features))
        rows = merged.positions(teacher.tasks[0])  # type: ignore[arg-type]
        scale = (1.0 / sharing[rows])
        weight = torch.zeros(merged.num_outputs, linear.in_features)
        weight[rows] = linear.weight.detach().cpu()[chosen] * scale[:, None]
        bias = torch.zeros(merged.num_outputs)
        if linear.bias is not None:
            bias[rows] = linear.bias.detach().cpu()[chosen] * scale
        state[f"head.pieces.{i}.weight"], state[f"head.pieces.{i}.bias"] = weight, bias
    net.load_state_dict(state, strict=True)
    return student
