"""``kamal inspect REF``: what a model repo holds, in any teacher format — the facts a user
needs before writing ``layer:`` settings (every tappable layer with its output shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import TeacherRef
from .errors import KamalError
from .evaluation import count_parameters
from .features import FeatureTap
from .interfaces import InputSpec
from .teacher_loading import resolve_teacher


def reference(ref: str, format_name: str | None = None) -> TeacherRef:
    """``hub:org/name[@revision]`` or a local folder, as a teacher reference."""
    if ref.startswith("hub:"):
        from .hub import parse_repo_ref

        try:
            repo, revision = parse_repo_ref(ref[4:])
        except ValueError as exc:
            raise KamalError(str(exc)) from None
        return TeacherRef(hub=repo, revision=revision, format=format_name)
    return TeacherRef(path=str(Path(ref).resolve()), format=format_name)


def inspect_repo(ref: str, format_name: str | None = None, batch: int = 2) -> dict[str, Any]:
    """Format, architecture, tasks, input spec, parameters and every layer's output shape
    for ``batch`` dummy images."""
    teacher = resolve_teacher(reference(ref, format_name), Path.cwd(), 0)
    model = teacher.model
    spec = model.input_spec
    names = [name for name, _ in model.features.named_modules() if name]
    with FeatureTap(model.features, names, teacher.name) as tap:
        model(torch.rand(batch, spec.channels, *spec.size))
    layers = [{"name": name, "shape": list(tap.features[name].shape)} for name in names
              if name in tap.features and isinstance(tap.features[name], torch.Tensor)]
    try:  # kamal models describe themselves; a library's network wrapped as a teacher may not
        described = model.config()
    except (NotImplementedError, AttributeError):
        described = {"architecture": type(model.features).__name__}
    return {
        "ref": ref, "format": teacher.source.get("format"), "source": teacher.source,
        "architecture": described.get("architecture"),
        "architecture_kwargs": described.get("architecture_kwargs") or {},
        "tasks": [t.to_dict() for t in teacher.tasks], "input": spec.to_dict(),
        "parameters": count_parameters(model),
        "feature_layers": list(getattr(model, "feature_layers", []) or []),
        "head_layer": getattr(model, "head_layer", None), "layers": layers,
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable table of :func:`inspect_repo`."""
    spec = info["input"]
    where = info["source"].get("hub") or info["source"].get("path")
    revision = f" @ {info['source']['revision']}" if info["source"].get("revision") else ""
    lines = [f"{info['ref']}",
             f"  format:       {info['format']}",
             f"  source:       {where}{revision}",
             f"  architecture: {info['architecture']} {info['architecture_kwargs'] or ''}".rstrip(),
             f"  input:        {spec['channels']}x{spec['size'][0]}x{spec['size'][1]}, "
             f"mean {tuple(spec['mean'])}, std {tuple(spec['std'])}",
             f"  reads:        {InputSpec.from_dict(spec).view.describe()}",
             f"  parameters:   {info['parameters']:,}"]
    for task in info["tasks"]:
        classes = task.get("classes") or []
        shown = f" {len(classes)} classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}"
        lines.append(f"  task:         {task['name']} [{task['kind']}]{shown if classes else ''}")
    width = max([len(layer["name"]) for layer in info["layers"]] + [5])
    lines += ["", f"  {'layer':<{width}}  output shape (batch of 2)  note", f"  {'-' * width}  "
              f"{'-' * 24}  ----"]
    for layer in info["layers"]:
        note = ("head" if layer["name"] == info["head_layer"] else
                "feature layer" if layer["name"] in info["feature_layers"] else "")
        lines.append(f"  {layer['name']:<{width}}  {str(tuple(layer['shape'])):<24}  {note}".rstrip())
    lines += ["", "  A layer's input is tapped as '<name>:in' (e.g. the head's: the pooled feature)."]
    return "\n".join(lines)
