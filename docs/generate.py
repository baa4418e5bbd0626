"""Regenerate the key tables in docs/configuration.md from the typed configs.

    python docs/generate.py        # rewrite the generated part in place
    python docs/generate.py --check  # exit 1 if it is out of date (used by the tests)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from kamal.config import RunConfig, TrainRunConfig, reference_markdown
from kamal.plugins import get_registry
from kamal.version import CORE_DISTRIBUTION

DOC = Path(__file__).with_name("configuration.md")
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def generated() -> str:
    """The Markdown that belongs between the markers."""
    parts = [reference_markdown(RunConfig, "`kamal amalgamate` configs"),
             reference_markdown(TrainRunConfig, "`kamal train` configs")]
    registry = get_registry()
    for name, entry in sorted(registry.entries("amalgamators").items()):
        if entry.distribution != CORE_DISTRIBUTION:
            continue  # plugins document their own hyperparameters in docs/algorithms/
        parts.append(reference_markdown(entry.load().Config, f"`algorithm: {name}` (built in)"))
    return "\n".join(parts)


# The public classes an amalgamator works with, and the members docs/plugins.md shows.
API_REFERENCE: list[tuple[str, list[str]]] = [
    ("Batch", []),
    ("Teacher", ["name", "model", "tasks", "input_spec", "source", "__call__"]),
    ("Student", ["tasks", "input_spec", "feature_layers", "features", "forward", "config"]),
    ("KamalModel", ["head_layer", "architecture"]),
    ("Task", ["name", "kind", "primary_metric", "num_outputs", "distill_loss",
              "supervised_loss", "merge", "embed", "map_targets", "new_meter"]),
    ("ClassificationTask", ["classes", "distill_loss", "supervised_loss"]),
    ("SegmentationTask", ["classes", "distill_loss", "supervised_loss"]),
    ("DepthTask", ["distill_loss", "supervised_loss"]),
    ("Amalgamator", ["check_teachers", "build_student", "setup", "trainable_modules",
                     "feature_layers", "student_images", "losses", "amalgamate", "describe",
                     "measurements"]),
    ("FeatureRequest", []),
    ("KDTerm", ["calibrate", "__call__"]),
    ("Trainer", ["fit", "hold_out", "images", "num_samples", "global_step", "output_dir", "device", "cfg",
                 "log_figure"]),
    ("Logger", ["check", "start", "log_scalars", "log_metrics", "log_figure", "log_report",
                "log_record", "close"]),
    ("FeatureTap", []),
    ("build_batch", []),
]
API_DOC = Path(__file__).with_name("plugins.md")
API_START, API_END = "<!-- api-reference:start -->", "<!-- api-reference:end -->"


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _member(cls: type, name: str) -> str:
    attr = inspect.getattr_static(cls, name, None)
    if isinstance(attr, property):
        hint = inspect.signature(attr.fget).return_annotation
        kind = f" -> {hint}" if hint is not inspect.Signature.empty else ""
        return f"- `.{name}`{kind} (property): {_summary(attr)}"
    if isinstance(attr, classmethod | staticmethod):
        attr = attr.__func__
    if callable(attr):
        signature = str(inspect.signature(attr)).replace("(self, ", "(").replace("(self)", "()")
        signature = signature.replace("(cls, ", "(").replace("(cls)", "()")
        return f"- `.{name}{signature}`: {_summary(attr)}"
    annotations = {k: v for c in reversed(cls.__mro__) for k, v in getattr(c, "__annotations__", {}).items()}
    if name in annotations:
        return f"- `.{name}`: `{annotations[name]}`"
    if attr is None:
        raise SystemExit(f"docs/generate.py: kamal.{cls.__name__}.{name} is not documented "
                         "(no annotation, property or method)")
    return f"- `.{name}` = `{attr!r}`"


def api_reference() -> str:
    """The Markdown between the api-reference markers of docs/plugins.md."""
    import dataclasses

    import kamal

    parts = []
    for name, members in API_REFERENCE:
        obj = getattr(kamal, name)
        parts.append(f"#### `kamal.{name}`\n")
        parts.append(inspect.getdoc(obj) or "")
        if dataclasses.is_dataclass(obj):
            parts.append("")
            parts += [f"- `.{f.name}`: `{f.type}`" for f in dataclasses.fields(obj)]
        if members:
            parts.append("")
            parts += [_member(obj, m) for m in members]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _rewrite(path: Path, start: str, end: str, body: str, check: bool) -> bool:
    """Put ``body`` between the markers; with ``check`` only say whether it is there."""
    text = path.read_text()
    head, found, rest = text.partition(start)
    if not found:
        raise SystemExit(f"{path} has no {start} marker")
    _, _, tail = rest.partition(end)
    updated = f"{head}{start}\n{body}\n{end}{tail}"
    if check:
        return updated == text
    path.write_text(updated)
    return True


def main() -> int:
    check = "--check" in sys.argv
    stale = [str(path.relative_to(path.parents[1])) for path, start, end, body in (
        (DOC, START, END, generated()), (API_DOC, API_START, API_END, api_reference()))
        if not _rewrite(path, start, end, body, check)]
    if stale:
        print(f"{', '.join(stale)} out of date: run python docs/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
