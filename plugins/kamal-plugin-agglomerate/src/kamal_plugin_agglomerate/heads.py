"""Which part of a teacher follows its tapped layer, and whether it can be transplanted.

A head is separable when one module of the teacher's network reads exactly the tapped
tensor and returns exactly a task's output -- checked on real images by identity of the
tensors, so what is transplanted is, by construction, everything that follows the tap.
It is transplanted by name: the student rebuilds the teacher's registered architecture,
keeps that submodule and fills it with the teacher's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kamal import FeatureTap, KamalModel, Teacher


@dataclass(frozen=True)
class HeadSearch:
    """The teacher's head for one tapped layer: ``config`` (the student's ``heads`` entry
    without its target index) and ``module`` (the teacher's own), or ``reason`` why not."""

    config: dict[str, Any] | None = None
    module: nn.Module | None = None
    reason: str = ""


def find_head(teacher: Teacher, layer: str, images: Tensor) -> HeadSearch:
    """The module that turns ``teacher``'s tapped ``layer`` into one of its task outputs."""
    model = teacher.model
    if not isinstance(model, KamalModel):
        return HeadSearch(reason=f"its network ({type(model).__name__}) is not built from "
                                 "kamal's architecture registry, so the student cannot rebuild "
                                 "its head")
    if [t.to_dict() for t in teacher.tasks] != [t.to_dict() for t in model.tasks]:
        return HeadSearch(reason="it uses a selection of its network's classes")
    root = model.features
    seen: dict[str, tuple[Any, Any]] = {}
    handles = [module.register_forward_hook(
        lambda _m, args, out, _name=name: seen.__setitem__(_name, (args[0] if args else None, out)))
        for name, module in root.named_modules() if name]
    try:
        with torch.no_grad(), FeatureTap(root, [layer], f"teacher '{teacher.name}'") as tap:
            outputs = model(images)
    finally:
        for handle in handles:
            handle.remove()
    feature = tap.features[layer]
    found = [(name, task) for name, (inp, out) in seen.items() for task, value in outputs.items()
             if inp is feature and out is value]
    if not found:
        return HeadSearch(reason=f"no single module reads layer '{layer}' and returns a task "
                                 "output (its head reads other layers too, or reshapes first)")
    name, task = min(found, key=lambda f: sum(p.numel() for p in root.get_submodule(f[0])
                                               .parameters()))
    config = {"module": name, "task": task,
              "model": {key: model.config()[key] for key in
                        ("architecture", "architecture_kwargs", "tasks", "input")}}
    return HeadSearch(config=config, module=root.get_submodule(name))
