"""``report.json``, the printed student-vs-teachers table, model cards and curve plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .amalgamator import Amalgamator
from .data.base import ImageDataset
from .data.transforms import ViewBatch
from .data.views import ViewPlan
from .evaluation import count_parameters, cpu_latency_ms, evaluate
from .interfaces import Student, Teacher
from .merging import LogitMerger, oracle_merge
from .models.base import merged_only


def model_entry(model: Student, data: ImageDataset | None, device: torch.device,
                name: str) -> dict[str, Any]:
    """Metrics (if data), parameters and CPU latency of one model."""
    spec = model.input_spec
    entry: dict[str, Any] = {"name": name}
    if data is not None:
        entry["metrics"] = evaluate(model, model.tasks, data, device, views=[spec.view])
    entry["input"] = spec.to_dict()
    entry["params"] = count_parameters(model)
    entry["latency_ms"] = cpu_latency_ms(model, spec.channels, spec.size)
    return entry


def teacher_entry(teacher: Teacher, data: ImageDataset | None, device: torch.device) -> dict[str, Any]:
    """A teacher's metrics on its own task(s), size, latency and provenance."""
    entry = model_entry(teacher.model, data, device, teacher.name)
    entry["source"] = teacher.source
    return entry


def amalgamation_report(*, algorithm: Amalgamator, teachers: list[Teacher], student: Student,
                        eval_data: ImageDataset | None, device: torch.device,
                        calibration: Callable[[], Iterable[Tensor | ViewBatch]],
                        merge_mode: str = "standardize") -> dict[str, Any]:
    """Everything ``report.json`` holds for an amalgamation run.

    The teachers' ensemble is calibrated on the batches ``calibration()`` gives (the
    transfer images the algorithm calibrated on, answered from the teacher cache when there
    is one), never on the evaluation data it is scored on.
    """
    report: dict[str, Any] = {
        "algorithm": algorithm.name,
        "hyperparameters": algorithm.describe(),
        "student": model_entry(student, eval_data, device, "student"),
        "teachers": [teacher_entry(t, eval_data, device) for t in teachers],
        "shared_classes": shared_classes(teachers),
    }
    if measured := algorithm.measurements():
        report["measurements"] = measured
    plan = ViewPlan.of(student.input_spec, [t.input_spec for t in teachers])
    if eval_data is not None:
        # the run's own merge (reported as "ensemble"), then standardize and naive
        # the run's own merger, when the algorithm keeps one, is already calibrated on the
        # same images: reused, so a learned gate is not fitted (nine passes) a second time
        trained = algorithm.trainable_modules().get("merger")
        for mode in dict.fromkeys((merge_mode, "standardize", "naive")):
            merger = LogitMerger(teachers, merged_only(student.tasks, teachers),  # type: ignore[arg-type]
                                 mode).to(device)
            if not merger.targets:  # it merges classification only; dense teachers stand alone
                break
            if (isinstance(trained, LogitMerger) and trained.mode == mode
                    and [t.name for t in trained.targets] == [t.name for t in merger.targets]):
                merger = trained
            elif mode != "naive":  # the naive merge has nothing to measure
                merger.calibrate(teachers, calibration(), device)
            metrics = evaluate(lambda x, m=merger: m([t(x) for t in teachers]), merger.targets,
                               eval_data, device, views=plan.views)
            key = "ensemble" if mode == merge_mode else f"ensemble_{mode}"
            report[key] = {"merge": mode, "metrics": metrics}
            if mode == "auto":  # which merge it picked, and the label-free figures why
                report[key].update(picked=merger.active, view_agreement=merger.agreement)
        else:  # every merge measured: the same sources give the ceiling
            report["ensemble_oracle"] = {"merge": "oracle gate", "metrics": oracle_metrics(
                teachers, merger, eval_data, device, plan)}
    return report


def oracle_metrics(teachers: list[Teacher], merger: LogitMerger, data: ImageDataset,
                   device: torch.device, plan: ViewPlan) -> dict[str, dict[str, float]]:
    """The teachers' ensemble with a perfect gate (:func:`~kamal.merging.oracle_merge`):
    how much of the gap to a supervised model is gating, not the student."""
    def predict(images: Tensor | ViewBatch, targets: Any) -> dict[str, Tensor]:
        outputs = [t(images) for t in teachers]
        return {task.name: oracle_merge(task, merger.sources[task.name], outputs,
                                        task.map_targets(data.classes, targets).to(device))
                for task in merger.targets}

    return evaluate(predict, merger.targets, data, device, views=plan.views, with_targets=True)


def shared_classes(teachers: list[Teacher]) -> dict[str, list[str]]:
    """Class names that several teachers know (merged, i.e. averaged), with those teachers."""
    owners: dict[str, list[str]] = {}
    for teacher in teachers:
        for task in teacher.tasks:
            for name in getattr(task, "classes", None) or []:
                if teacher.name not in owners.setdefault(name, []):
                    owners[name].append(teacher.name)
    return {name: who for name, who in owners.items() if len(who) > 1}


def _fmt(metrics: dict[str, dict[str, float]] | None) -> str:
    if not metrics:
        return "-"
    parts = []
    for task, values in metrics.items():
        shown = {k: v for k, v in values.items() if k != "samples"}
        parts.append(f"{task}: " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    return "; ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per model, metrics, params, latency."""
    rows = [("model", "metrics", "params", "latency ms")]
    if "student" in report:
        s = report["student"]
        rows.append((f"student ({report.get('algorithm', '?')})", _fmt(s.get("metrics")),
                     f"{s['params']:,}", f"{s['latency_ms']:.3f}"))
    if "model" in report:
        m = report["model"]
        rows.append((m.get("name", "model"), _fmt(m.get("metrics")), f"{m['params']:,}",
                     f"{m['latency_ms']:.3f}"))
    for key in ("ensemble", "ensemble_standardize", "ensemble_naive", "ensemble_oracle"):
        if key in report:
            e = report[key]
            merge = f"auto: {e['picked']}" if "picked" in e else e.get("merge")
            label = f"teachers' ensemble ({merge})" if merge else "teachers' ensemble"
            rows.append((label, _fmt(e.get("metrics")), "", ""))
    for t in report.get("teachers", []):
        rows.append((f"teacher {t['name']}", _fmt(t.get("metrics")), f"{t['params']:,}",
                     f"{t['latency_ms']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_card(report: dict[str, Any], provenance: dict[str, Any], repo_id: str | None = None) -> str:
    """``README.md`` of a model repo: YAML front matter, provenance, metrics, how to load.

    ``repo_id`` (when publishing) makes the usage section load from the Hub.
    """
    import yaml

    teachers = provenance.get("teachers", [])
    front = {"library_name": "kamal", "tags": ["kamal", "knowledge-amalgamation"]}
    if "algorithm" in provenance:
        front["tags"].append(f"kamal-{provenance['algorithm']}")
        front["kamal"] = {"algorithm": provenance["algorithm"],
                          "hyperparameters": provenance.get("hyperparameters", {}),
                          "teachers": teachers}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    if "algorithm" in provenance:
        lines += ["# kamal student", "",
                  f"Amalgamated with `{provenance['algorithm']}` from {len(teachers)} teachers, "
                  "without labels.", "", "## Teachers", ""]
        for t in teachers:
            where = f"hub `{t['hub']}` @ `{t.get('revision')}`" if "hub" in t else f"`{t.get('path')}`"
            lines.append(f"- **{t['name']}**: {where}, weights sha256 `{t.get('sha256', '?')}`")
        lines += ["", "## Hyperparameters", "", "```json",
                  json.dumps(provenance.get("hyperparameters", {}), indent=2), "```", ""]
    else:
        lines += ["# kamal model", "", "Trained with `kamal train` (supervised).", ""]
    if report:
        lines += ["## Metrics", "", "```", format_table(report), "```", ""]
    load = (["from kamal import load_from_hub", f"model = load_from_hub('{repo_id}')"] if repo_id
            else ["from kamal import load_model", "model = load_model('path/to/this/folder')"])
    lines += ["## Usage", "", "```python", *load,
              "outputs = model(images)  # {task_name: output}, images in [0, 1]", "```", ""]
    if repo_id:
        lines += [f"As a teacher of a new run: `teachers: [{{hub: {repo_id}}}]`; "
                  f"inspect it with `kamal pull {repo_id}`.", ""]
    return "\n".join(lines)


def plot_curves(run_dir: Path) -> list[Path]:
    """``loss.png`` and ``eval.png`` from ``metrics.jsonl`` (skipped when empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    written = []
    epochs = [r for r in records if r.get("event") == "epoch"]
    if epochs:
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = sorted({k for r in epochs for k in r if k.startswith("loss/")})
        for key in keys:
            points = [(r["step"], r[key]) for r in epochs if key in r]
            ax.plot(*zip(*points, strict=True), marker="o", label=key[5:])
        ax.set(xlabel="step", ylabel="mean loss per epoch", yscale="log", title="training losses")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "loss.png")
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in evals:
            for task, metrics in r["metrics"].items():
                for name, value in metrics.items():
                    if name != "samples":
                        series.setdefault(f"{task}/{name}", []).append((r["step"], value))
        for key, points in series.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set(xlabel="step", ylabel="metric", title="evaluation")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "eval.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "eval.png")
    return written
