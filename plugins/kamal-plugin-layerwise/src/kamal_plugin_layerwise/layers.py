"""Which layers to tap, whether they line up across models, and which weights feed each.

All three are answered with one dry forward pass on a few transfer images, so the checks see
the real shapes (whatever the input size) instead of guessing them from the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kamal import FeatureTap, KamalError, Student, Teacher

# Tapped layers per registered architecture (shallow to deep): the stages whose outputs are
# spatial maps. Other architectures fall back to their spatial ``feature_layers``.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "small-cnn": ("block1", "block2", "block3"),
    "small-vgg": ("block1", "block2", "block3"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
}


def _has_layer(model: Student, layer: str) -> bool:
    name = layer[:-3] if layer.endswith(":in") else layer
    return bool(name) and name in dict(model.features.named_modules())


def _shapes(model: Student, layers: Sequence[str], images: Tensor,
            owner: str) -> dict[str, tuple[int, ...] | None]:
    """Per-sample feature shape of every layer (``None`` when the model has no such layer)."""
    present = [layer for layer in layers if _has_layer(model, layer)]
    was_training = model.training
    model.eval()  # a probe must not move batch-norm statistics
    try:
        with torch.no_grad(), FeatureTap(model.features, present, owner) as tap:
            model(images)
    finally:
        model.train(was_training)
    return {layer: (tuple(tap.features[layer].shape[1:]) if layer in tap.features else None)
            for layer in layers}


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else "x".join(map(str, shape))


def default_layers(student: Student, images: Tensor) -> list[str]:
    """The architecture's default layers, else its feature layers that give spatial maps."""
    known = DEFAULT_LAYERS.get(getattr(student, "architecture", ""))
    if known is not None:
        return list(known)
    shapes = _shapes(student, list(student.feature_layers), images, "student")
    spatial = [layer for layer, s in shapes.items()
               if s is not None and len(s) == 3 and s[1] * s[2] > 1]
    if not spatial:
        raise KamalError("layerwise: the student's architecture has no feature layer giving a "
                         f"spatial map (its feature layers: {', '.join(student.feature_layers)}); "
                         "name the layers to tap with algorithm.layers=[...]")
    return spatial


def check_alignment(student: Student, teachers: Sequence[Teacher], layers: Sequence[str],
                    images: Tensor) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Channels per layer of the student and of each teacher, or an error listing misfits.

    Every tapped layer must exist in every model and give an ``(N, C, H, W)`` map whose
    ``H x W`` equals the student's there; channel counts may differ.
    """
    student_shapes = _shapes(student, layers, images, "student")
    teacher_shapes = [_shapes(t.model, layers, images, t.name) for t in teachers]
    problems = []
    for layer in layers:
        mine = student_shapes[layer]
        theirs = [shapes[layer] for shapes in teacher_shapes]
        bad = mine is None or len(mine) != 3 or any(
            s is None or len(s) != 3 or s[1:] != mine[1:] for s in theirs)
        if bad:
            row = ", ".join([f"student {_fmt(mine)}"] + [
                f"{t.name} {_fmt(s)}" for t, s in zip(teachers, theirs, strict=True)])
            problems.append(f"  {layer}: {row}")
    if problems:
        names = [set(student.feature_layers)] + [set(t.model.feature_layers) for t in teachers]
        common = [n for n in student.feature_layers if all(n in s for s in names)]
        raise KamalError(
            "layerwise: the tapped layers do not line up across the student and the teachers "
            "(each needs a CxHxW map with the same HxW in every model; channels may differ):\n"
            + "\n".join(problems)
            + f"\nLayers every model names: {', '.join(common) or 'none'}. Choose layers that "
            "line up with algorithm.layers=[...], or use teachers of the student's "
            "architecture family (kd and other algorithms need no matching layers).")
    student_channels = {layer: student_shapes[layer][0] for layer in layers}  # type: ignore[index]
    teacher_channels = {layer: [shapes[layer][0] for shapes in teacher_shapes]  # type: ignore[index]
                        for layer in layers}
    return student_channels, teacher_channels


def feeding_parameters(student: Student, layers: Sequence[str],
                       images: Tensor) -> dict[str, list[nn.Parameter]]:
    """For each layer, the student parameters its output depends on (the layers up to it).

    Found by back-propagating from the layer's output once, so it holds for any architecture
    (skip connections, stems) without knowing its module order.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    was_training = student.training
    student.eval()
    try:
        with torch.enable_grad(), FeatureTap(student.features, list(layers), "student") as tap:
            student(images)
            feeding = {}
            for layer in layers:
                grads = torch.autograd.grad(tap.features[layer].sum(), params,
                                            retain_graph=True, allow_unused=True)
                feeding[layer] = [p for p, g in zip(params, grads, strict=True) if g is not None]
    finally:
        student.train(was_training)
    return feeding
