"""Wall time of every bundled amalgamation example, as a user runs it:
``kamal amalgamate examples/<name>/<config>.yaml`` in a fresh process (imports, teacher
loading, calibration, training, the report), one after another on a quiet machine, against
issue 16's target of at most ``LIMIT_S`` seconds each. Each example's headline figure
(the student's top-1 or mIoU on its eval data) is recorded beside its time; the quality of
each is documented and checked by benchmarks/quality.py.

    python benchmarks/example_runs.py

Writes the "examples" key of docs/benchmarks.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

LIMIT_S = 180


def amalgamation_configs() -> list[Path]:
    """Every example config that ``kamal amalgamate`` runs (teacher-training configs are
    ``kamal train``'s, for make_teachers.sh)."""
    return [path for path in sorted((_report.ROOT / "examples").glob("*/*.yaml"))
            if "teachers" in (yaml.safe_load(path.read_text()) or {})]


def headline(report: dict[str, Any]) -> str:
    """The student's first top-1 or mIoU on the eval data."""
    for task, metrics in report["student"]["metrics"].items():
        for key in ("top1", "miou"):
            if key in metrics:
                return f"{task} {key} {metrics[key]:.3f}"
    return "–"


def run(config: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kamal", "amalgamate", str(config), "--output",
                           str(out), "--quiet"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{config} failed:\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": round(seconds, 1), "headline": headline(report)}


def within_limit(results: dict[str, dict[str, Any]]) -> bool:
    """Whether every example finished within ``LIMIT_S``."""
    return all(r["seconds"] <= LIMIT_S for r in results.values())


def main() -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in amalgamation_configs():
            name = str(config.relative_to(_report.ROOT))
            results[name] = run(config, Path(tmp) / config.parent.name / config.stem)
            print(f"{name}: {results[name]['seconds']} s, {results[name]['headline']}", flush=True)
    slowest = max(results, key=lambda name: results[name]["seconds"])
    met = within_limit(results)
    lines = ["## Every bundled example, end to end", "",
             "`kamal amalgamate <config>` in a fresh process, one after another; the time "
             "includes imports, teacher loading, calibration, training and the report.", "",
             "| example | wall time | student |", "|---|---|---|"]
    lines += [f"| `{name}` | {r['seconds']:.0f} s | {r['headline']} |" for name, r in results.items()]
    lines += ["", f"Target: every example in at most {LIMIT_S} s: "
              f"**{'met' if met else 'missed'}** (slowest: `{slowest}`, "
              f"{results[slowest]['seconds']:.0f} s)."]
    text = "\n".join(lines)
    print(text)
    _report.update("examples", text, {"results": results, "limit_s": LIMIT_S, "met": met})


if __name__ == "__main__":
    main()
