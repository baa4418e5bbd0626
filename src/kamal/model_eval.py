"""``kamal evaluate``: metrics of a model repo or a run's model, optionally beside the
teachers it was amalgamated from and their calibrated ensemble."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import report as reporting
from .config import TeacherRef
from .data.base import build_dataset, split_data_ref
from .data.views import (
    ViewPlan,
    check_data_matches,
    check_label_names,
    image_batches,
    require_labels,
)
from .engine import resolve_device
from .errors import ConfigError, KamalError, RegistryError
from .evaluation import evaluate
from .merging import LogitMerger
from .models.base import merged_only
from .progress import track
from .repo import load_model
from .run_folder import model_folder
from .teacher_loading import resolve_teacher


def evaluate_repo(model_dir: str | Path, data: str, options: dict[str, Any] | None = None,
                  with_teachers: bool = False, device_name: str = "auto") -> dict[str, Any]:
    """Metrics of a model repo (or a run folder's model) on ``data`` (``DATASET[:SPLIT]``),
    optionally beside its recorded teachers and their ensemble."""
    folder = model_folder(model_dir)
    device = resolve_device(device_name)
    model = load_model(folder).to(device).eval()
    try:
        name, split = split_data_ref(data)
    except RegistryError as exc:
        raise ConfigError(f"--data: {exc}") from exc
    dataset = build_dataset(name, split, options, key="--data")
    check_data_matches(dataset, model.input_spec, "--data")
    require_labels(dataset, "--data")
    check_label_names(dataset, model.tasks, "the model", "--data", every_class=False)
    result: dict[str, Any] = {"model": reporting.model_entry(model, dataset, device, str(folder))}
    if with_teachers:
        config = json.loads((folder / "config.json").read_text())
        recorded = (config.get("amalgamation") or {}).get("teachers") or []
        if not recorded:
            raise KamalError(f"{folder} records no teachers (it was not made by kamal amalgamate)")
        teachers = [resolve_teacher(recorded_teacher(entry), Path.cwd(), i).to(device)
                    for i, entry in enumerate(recorded)]
        result["teachers"] = [reporting.teacher_entry(t, dataset, device) for t in teachers]
        merger = LogitMerger(teachers, merged_only(model.tasks, teachers))
        if merger.targets:  # classification tasks only; dense teachers are listed alone
            plan = ViewPlan.of(model.input_spec, [t.input_spec for t in teachers])
            batches = track(image_batches(dataset, 256, plan), "calibrating the teachers",
                            -(-len(dataset) // 256))
            merger.calibrate(teachers, batches, device)
            result["ensemble"] = {"metrics": evaluate(lambda x: merger([t(x) for t in teachers]),
                                                      merger.targets, dataset, device,
                                                      views=plan.views)}
    return result


def recorded_teacher(entry: dict[str, Any]) -> TeacherRef:
    """The reference that loads a teacher as a student's provenance records it: the same
    repo at the same revision, format and class selection."""
    return TeacherRef(name=entry["name"], path=entry.get("path"), hub=entry.get("hub"),
                      revision=entry.get("revision"), format=entry.get("format"),
                      classes=entry.get("classes"), rename=entry.get("rename"))
