"""Quality of every installed algorithm beside its teachers, their ensemble and a supervised
student of the same architecture: the digits examples (3 seeds) and sbm on scenes.
Rewrites the "quality" section of docs/benchmarks.md and its key in docs/benchmarks.json.

    python benchmarks/quality.py [--seeds 0 1 2] [--scene-seeds 0] [--epochs N] [--only kd ...]

``--epochs`` overrides every run's ``train.epochs`` (quick checks; the table then says so).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
SCENES = ROOT / "examples" / "scenes"
SUPERVISED = DIGITS / "supervised.yaml"


def _only_metric(metrics: dict[str, dict[str, float]], name: str) -> float | None:
    """The value of metric ``name`` in whichever task reports it."""
    for values in metrics.values():
        if name in values:
            return values[name]
    return None


def _timed(fn, *args, **kwargs) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def _algorithm(config: Path) -> str | None:
    import yaml

    return (yaml.safe_load(config.read_text()).get("algorithm") or {}).get("name")


def digits(tmp: Path, seeds: list[int], overrides: list[str], only: set[str] | None
           ) -> tuple[list[str], dict[str, Any]]:
    """Every installed algorithm's digits example, the supervised reference."""
    from kamal import amalgamate, train
    from kamal.plugins import get_registry

    installed = set(get_registry().names("amalgamators"))
    sup_runs = []
    for seed in seeds:
        report, seconds = _timed(train, SUPERVISED, tmp / f"supervised{seed}", progress=False,
                                 overrides=[*overrides, f"train.seed={seed}"])
        sup_runs.append({"seed": seed, "top1": report["model"]["metrics"]["digits"]["top1"],
                         "seconds": round(seconds, 1)})
    supervised = [r["top1"] for r in sup_runs]
    rows, data = [], {"supervised": sup_runs, "examples": {}}
    for config in sorted(DIGITS.glob("*.yaml")):
        algorithm = _algorithm(config)
        if algorithm not in installed or (only and algorithm not in only):
            continue
        runs = []
        for seed in seeds:
            report, seconds = _timed(amalgamate, config, tmp / f"{config.stem}{seed}",
                                     progress=False, overrides=[*overrides, f"train.seed={seed}"])
            runs.append({"seed": seed, "seconds": round(seconds, 1),
                         "student": report["student"]["metrics"]["digits"]["top1"],
                         "ensemble": _only_metric(report["ensemble"]["metrics"], "top1"),
                         "teachers": {t["name"]: _only_metric(t["metrics"], "top1")
                                      for t in report["teachers"]},
                         "student_params": report["student"]["params"],
                         "teacher_cache": report.get("teacher_cache")})
        data["examples"][config.stem] = {"algorithm": algorithm, "runs": runs}
        students = [r["student"] for r in runs]
        ensembles = [r["ensemble"] for r in runs]
        teachers = " / ".join(f"{name} {value:.3f}" for name, value in runs[0]["teachers"].items())
        architecture = _student_architecture(config)
        reference = (_mean_sd(supervised) if architecture == _student_architecture(SUPERVISED,
                                                                                    "model")
                     else "– (no same-architecture reference)")
        rows.append(f"| {config.stem} | {algorithm} | **{_mean_sd(students)}** | "
                    f"{_mean_sd(ensembles)} | {reference} | {teachers} | "
                    f"{runs[0]['student_params']:,} | {statistics.median(r['seconds'] for r in runs):.0f} |")
    lines = [
        "### Digits (10 classes, test split, top-1)",
        "",
        f"Seeds {seeds}, mean ± population sd. Students learn from two teachers (digits 0-4 and "
        "5-9) on the unlabeled transfer split; the supervised reference is the student's "
        "architecture (small-cnn w24) trained with every label of the train split "
        "(`examples/digits/supervised.yaml`). Teachers are scored on their own five classes.",
        "",
        "| example | algorithm | KA student | teachers' ensemble | supervised, same "
        "architecture | teachers (own classes) | student params | s/run |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return lines, data


def _student_architecture(config: Path, section: str = "student") -> tuple[str, str]:
    import yaml

    block = yaml.safe_load(config.read_text())[section]
    return block["architecture"], str(sorted((block.get("architecture_kwargs") or {}).items()))


def scenes(tmp: Path, seeds: list[int], overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """sbm on scenes: segmentation and depth of the student beside its two teachers."""
    from kamal import amalgamate

    config = SCENES / "sbm.yaml"
    runs = []
    for seed in seeds:
        report, seconds = _timed(amalgamate, config, tmp / f"sbm{seed}", progress=False,
                                 overrides=[*overrides, f"train.seed={seed}"])
        runs.append({"seed": seed, "seconds": round(seconds, 1),
                     "student": report["student"]["metrics"],
                     "student_params": report["student"]["params"],
                     "teachers": {t["name"]: {"metrics": t["metrics"], "params": t["params"]}
                                  for t in report["teachers"]}})
    keys = ("miou", "pixel_acc", "rmse", "abs_rel")

    def cells(per_run: list[dict[str, dict[str, float]]]) -> str:
        out = []
        for key in keys:
            values = [v for v in (_only_metric(m, key) for m in per_run) if v is not None]
            out.append("–" if not values else (f"{values[0]:.3f}" if len(values) == 1
                                              else _mean_sd(values)))
        return " | ".join(out)

    lines = [
        "### Scenes: sbm (segmentation + depth, test split)",
        "",
        f"Seeds {seeds}. The shipped teachers (SegNet width 16, each trained with labels on one "
        "task) are the supervised same-architecture references; there is no joint supervised "
        "student (`kamal train` fits one task) and no ensemble (one teacher per task). "
        "mIoU and pixel accuracy: higher is better; RMSE and abs rel: lower is better.",
        "",
        "| model | mIoU | pixel acc | depth RMSE | depth abs rel | params |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in runs[0]["teachers"].items():
        lines.append(f"| teacher {name} | {cells([entry['metrics']])} | {entry['params']:,} |")
    lines.append(f"| **sbm student** | {cells([r['student'] for r in runs])} | "
                 f"{runs[0]['student_params']:,} |")
    return lines, {"sbm": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scene-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, help="override train.epochs (quick runs)")
    parser.add_argument("--only", nargs="+", help="only these algorithms (sbm = scenes)")
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}"] if args.epochs else []
    only = set(args.only) if args.only else None
    from kamal.plugins import get_registry

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lines, data = digits(Path(tmp), args.seeds, overrides, only)
        if "sbm" in get_registry().names("amalgamators") and (only is None or "sbm" in only):
            more, data["scenes"] = scenes(Path(tmp), args.scene_seeds, overrides)
            lines += ["", *more]
    title = "## Quality" + (f" (quick check: every run {args.epochs} epochs)" if args.epochs else "")
    lines = [title, "", *lines, "", f"Whole script: {(time.perf_counter() - started) / 60:.0f} min."]
    _report.update("quality", "\n".join(lines), data)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
