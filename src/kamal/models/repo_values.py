"""Values a library's model repo states about itself (classes, input size, mean/std),
checked before they are used: shared by the teacher formats and the timm wrapper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelRepoError
from ..interfaces import InputSpec

Classes = list[str] | dict[int, str] | None


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


def check_input_spec(folder: Path, size: Any, mean: Any, std: Any, resize: str = "shorter",
                     resize_to: Any = (), interpolation: str = "bilinear",
                     backend: str = "tensor") -> InputSpec:
    """An :class:`~kamal.InputSpec` from a repo's preprocessing values, or a clear error for
    absurd ones (size 0, negative or huge, std 0, a channel count that does not match, an
    eval transform kamal cannot reproduce)."""
    from ..data.transforms import view_problem

    try:
        channels, height, width = (int(v) for v in size)
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        resize_to = tuple(int(v) for v in resize_to or ())
    except (TypeError, ValueError):
        raise ModelRepoError(f"{folder}/config.json: input_size must be [channels, height, width] "
                             f"and mean/std lists of numbers, got {size}, {mean}, {std}") from None
    problems = []
    problem = view_problem(channels, (height, width), resize, resize_to, interpolation, backend)
    if problem:
        problems.append(problem)
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        problems.append(f"{len(mean)} mean / {len(std)} std values for {channels} channels")
    if any(s <= 0 for s in std):
        problems.append(f"std {std} (must be positive)")
    if problems:
        raise ModelRepoError(f"{folder}: the preprocessing values make no sense: "
                             f"{'; '.join(problems)}")
    return InputSpec(channels, (height, width), tuple(mean), tuple(std), resize, resize_to,
                     interpolation, backend)
