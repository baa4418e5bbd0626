"""Stored augmented views (``train.teacher_cache_views``, FKD) against live teachers on the
same augmentation: examples/digits/kd.yaml (random shifts on) trained three ways per seed:

* live: no cache, the teachers run on every augmented batch;
* K stored views per image, cached in float32;
* the same views cached in float16.

Each run's student top-1 (test split), cache size and wall time, and issue 16's targets:
stored views within ``WITHIN_LIVE`` of live (mean over seeds), the float16 cache at least
``SMALLER`` times smaller and within ``WITHIN_FP32`` of float32. The seeds pick
everything (initialisation, shuffling, which views are drawn); nothing is tuned here.

    python benchmarks/stored_views.py [--seeds 0 1 2] [--views 4]

Writes the "stored_views" key of docs/benchmarks.json and its section of docs/benchmarks.md.
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

CONFIG = _report.ROOT / "examples" / "digits" / "kd.yaml"
WITHIN_LIVE, SMALLER, WITHIN_FP32 = 0.005, 1.9, 0.003


def variants(views: int) -> dict[str, list[str]]:
    stored = ["train.teacher_cache=memory", f"train.teacher_cache_views={views}"]
    return {"live teachers (no cache)": ["train.teacher_cache=off"],
            f"{views} stored views, float32": [*stored, "train.teacher_cache_dtype=float32"],
            f"{views} stored views, float16": [*stored, "train.teacher_cache_dtype=float16"]}


def run(out: Path, overrides: list[str], seed: int) -> dict[str, Any]:
    from kamal import amalgamate

    start = time.perf_counter()
    report = amalgamate(CONFIG, out, progress=False, overrides=[*overrides, f"train.seed={seed}"])
    return {"seed": seed, "student": report["student"]["metrics"]["digits"]["top1"],
            "cache_bytes": report["teacher_cache"]["bytes"],
            "seconds": round(time.perf_counter() - start, 1)}


def verdicts(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The targets, each from the figures."""
    live, fp32, fp16 = (results[label] for label in results)
    top1 = {name: statistics.mean(r["student"] for r in runs)
            for name, runs in (("live", live), ("fp32", fp32), ("fp16", fp16))}
    ratio = fp32[0]["cache_bytes"] / fp16[0]["cache_bytes"]
    return {
        "stored views within 0.5 point of live teachers": {
            "value": top1["fp32"] - top1["live"], "target": -WITHIN_LIVE,
            "met": abs(top1["fp32"] - top1["live"]) <= WITHIN_LIVE},
        "float16 cache smaller than float32": {"value": ratio, "target": SMALLER,
                                               "met": ratio >= SMALLER},
        "float16 cache within 0.3 point of float32": {
            "value": top1["fp16"] - top1["fp32"], "target": -WITHIN_FP32,
            "met": abs(top1["fp16"] - top1["fp32"]) <= WITHIN_FP32}}


def markdown(results: dict[str, list[dict[str, Any]]], checks: dict[str, dict[str, Any]],
             views: int) -> str:
    lines = ["## Stored augmented views (teacher cache under augmentation)", "",
             f"kd on examples/digits (random shifts on), each row over seeds "
             f"{', '.join(str(r['seed']) for r in next(iter(results.values())))}; "
             f"`train.teacher_cache_views: {views}` draws {views} augmentations of every "
             "transfer image once, caches the teachers' outputs on exactly those images, and "
             "each epoch trains on one of them per image.", "",
             "| teachers | student top-1 (mean ± sd) | per seed | cache | run time (median) |",
             "|---|---|---|---|---|"]
    for label, runs in results.items():
        top1 = [r["student"] for r in runs]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        size = runs[0]["cache_bytes"]
        lines.append(f"| {label} | {100 * statistics.mean(top1):.1f}% ± {100 * spread:.1f} | "
                     + " / ".join(f"{100 * t:.1f}" for t in top1)
                     + f" | {size / 2**20:.2f} MiB | "
                     f"{statistics.median(r['seconds'] for r in runs):.1f} s |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    for label, check in checks.items():
        shown = (f"{check['value']:.2f}x" if "smaller" in label
                 else f"{100 * check['value']:+.2f} points")
        lines.append(f"| {label} | {shown} | {'met' if check['met'] else 'missed'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(variants(args.views).items()):
            results[label] = [run(Path(tmp) / f"{i}-{seed}", overrides, seed)
                              for seed in args.seeds]
            print(label, [r["student"] for r in results[label]], flush=True)
    checks = verdicts(results)
    text = markdown(results, checks, args.views)
    print(text)
    _report.update("stored_views", text, {"results": results, "verdicts": checks,
                                          "views": args.views})


if __name__ == "__main__":
    main()
