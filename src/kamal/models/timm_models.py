"""Teachers in timm's Hub layout (``config.json`` with ``architecture`` + ``pretrained_cfg``,
``model.safetensors``), loaded when the optional extra ``kamal-core[timm]`` is installed.

The user picks the classes the teacher is expert in (``classes:`` in the teacher reference);
the teacher's task outputs the logits of those classes only. Wrapped models are ordinary
kamal models (architecture ``timm``), so a student of this architecture saves and reloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import KamalError, ModelRepoError
from .base import Architecture, head_removed

INSTALL_HINT = "install the optional extra: pip install 'kamal-core[timm]'"


def _timm():
    try:
        import timm
    except ImportError:
        raise KamalError(f"this is a timm model but timm is not installed; {INSTALL_HINT}") from None
    return timm


class TimmClassifier(nn.Module):
    """A timm model whose output is restricted to ``class_indices`` of its head."""

    def __init__(self, num_outputs: int, in_channels: int = 3, model_name: str = "",
                 model_args: dict[str, Any] | None = None,
                 class_indices: list[int] | None = None) -> None:
        super().__init__()
        timm = _timm()
        if not timm.is_model(model_name):
            raise ValueError(f"timm has no architecture '{model_name}'")
        args = dict(model_args or {})
        args.setdefault("in_chans", in_channels)
        if class_indices is None:  # a student: a head with one output per class
            args.setdefault("num_classes", num_outputs)
        self.model = timm.create_model(model_name, pretrained=False, **args)
        head = self.model.num_classes
        self.class_indices = list(class_indices if class_indices is not None else range(head))
        if len(self.class_indices) != num_outputs or any(
                not 0 <= i < head for i in self.class_indices):
            raise ValueError(f"class_indices must be {num_outputs} indices in [0, {head})")
        # the classifier module, as timm's pretrained_cfg names it (e.g. fc, head)
        classifier = str((getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or "")
        modules = dict(self.model.named_modules())
        self.head_layer = f"model.{classifier}" if classifier in modules else None
        # the model's top-level blocks with weights, shallow to deep
        self.feature_layers = [f"model.{name}" for name, module in self.model.named_children()
                               if name != classifier and any(True for _ in module.parameters())]

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if head_removed(self) or self.class_indices == list(range(out.shape[1])):
            return out  # the head's own output: no copy, and a head others can find
        return out[:, self.class_indices]


TIMM = Architecture(TimmClassifier, (), head=None, description="any timm model (kamal-core[timm])")


def is_timm_repo(folder: Path) -> bool:
    """A timm-layout config: ``architecture`` and ``pretrained_cfg`` but no kamal ``tasks``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "pretrained_cfg" in config and "architecture" in config and "tasks" not in config


def load_timm_model(folder: Path, task_name: str, classes: list[str] | dict[int, str] | None):
    """Build a :class:`~kamal.KamalModel` around the timm repo in ``folder`` (strict load)."""
    from ..tasks.classification import ClassificationTask
    from ..weights import load_weights
    from .base import KamalModel
    from .repo_values import check_input_spec

    config = json.loads((folder / "config.json").read_text())
    cfg = config.get("pretrained_cfg") or {}
    head = int(config.get("num_classes") or cfg.get("num_classes") or 0)
    # timm stores label names at the top level, as a list or as {index: name} with gaps
    named = config.get("label_names") or cfg.get("label_names") or {}
    if isinstance(named, dict):
        named = {int(k): str(v) for k, v in named.items()}
        labels = [named.get(i, str(i)) for i in range(head)]
        unnamed = {i for i in range(head) if i not in named}
    else:
        labels = [str(n) for n in named] or [str(i) for i in range(head)]
        unnamed = set() if named else set(range(head))
    if classes is None:
        indices, names = list(range(head)), labels
    elif isinstance(classes, dict):
        indices, names = [int(i) for i in classes], [str(n) for n in classes.values()]
    else:
        missing = [c for c in classes if str(c) not in labels]
        if missing:
            raise ModelRepoError(f"{folder}: classes {missing} are not among this model's labels; "
                                 "select them by index instead: classes: {index: name}")
        indices, names = [labels.index(str(c)) for c in classes], [str(c) for c in classes]
    size = cfg.get("input_size") or [3, 224, 224]
    spec = check_input_spec(folder, size, cfg.get("mean") or (0.5,), cfg.get("std") or (0.5,),
                            *_eval_transform(folder, cfg, size))
    kwargs = {"model_name": config["architecture"], "model_args": config.get("model_args") or
              {"num_classes": head}, "class_indices": indices}
    task = ClassificationTask(task_name, names)
    task.guessed_names = classes is None and bool(unnamed)
    model = KamalModel("timm", [task], spec, kwargs)
    load_weights(model.net.model, folder / "model.safetensors", f"timm '{config['architecture']}'")
    return model


def _eval_transform(folder: Path, cfg: dict[str, Any], size: Any) -> tuple[str, tuple[int, ...], str,
                                                                           str]:
    """(resize, resize_to, interpolation, backend) of timm's eval transform for
    ``pretrained_cfg`` (``timm.data.create_transform`` on PIL images)."""
    import math

    crop_pct = cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    interpolation = str(cfg.get("interpolation") or "bilinear")
    try:
        height, width = int(size[1]), int(size[2])
        crop_pct = float(crop_pct)
    except (TypeError, ValueError, IndexError):
        raise ModelRepoError(f"{folder}/config.json: input_size {size} / crop_pct {crop_pct} "
                             "are not numbers") from None
    if not 0 < crop_pct <= 1:
        raise ModelRepoError(f"{folder}/config.json: the preprocessing values make no sense: "
                             f"crop_pct {crop_pct} (must be in (0, 1])")
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        return "squash", scaled, interpolation, "pil"
    if mode == "center" and height == width:
        return "shorter", scaled[:1], interpolation, "pil"
    raise ModelRepoError(f"{folder}/config.json: timm's crop_mode '{mode}' at {height}x{width} "
                         "is not one kamal reproduces (it does center for square sizes and squash)")
