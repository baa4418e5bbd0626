"""Stored augmented views (``train.teacher_cache_views``, FKD) against live teachers on the
same augmentation: examples/digits/kd.yaml (random shifts on) trained three ways per seed:

* live: no cache, the teachers run on every augmented batch;
* K stored views per image, cached in float32;
* the same views cached in float16;
* 2K stored views in float32 (no target: how the cost of fewer views changes with K).

Each run's student top-1 (test split), cache size and wall time, and issue 16's targets:
stored views within ``WITHIN_LIVE`` of live, the float16 cache at least ``SMALLER`` times
smaller and within ``WITHIN_FP32`` of float32. The seeds pick everything (initialisation,
shuffling, which views are drawn); nothing is tuned here.

An accuracy target is an equivalence: the mean of the per-seed differences (the same seed
in both rows, so the same initialisation, order and views) and its ``CONFIDENCE``
t-interval. Met when the whole interval lies within the margin, missed when it lies
wholly outside, undecided otherwise. One seed's top-1 moves by most of a point with the
trajectory alone (float16 rounding of the targets is enough to change it), so three seeds
cannot resolve a 0.3-point margin; the default is 30 seeds, fixed before measuring.

    OMP_NUM_THREADS=1 python benchmarks/stored_views.py [--seeds 0 1 2 ...] [--views 4]

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
CONFIDENCE, DEFAULT_SEEDS = 0.95, 30


def variants(views: int) -> dict[str, list[str]]:
    def stored(count: int, dtype: str) -> list[str]:
        return ["train.teacher_cache=memory", f"train.teacher_cache_views={count}",
                f"train.teacher_cache_dtype={dtype}"]

    return {"live teachers (no cache)": ["train.teacher_cache=off"],
            f"{views} stored views, float32": stored(views, "float32"),
            f"{views} stored views, float16": stored(views, "float16"),
            f"{2 * views} stored views, float32": stored(2 * views, "float32")}


def run(out: Path, overrides: list[str], seed: int) -> dict[str, Any]:
    from kamal import amalgamate

    start = time.perf_counter()
    report = amalgamate(CONFIG, out, progress=False, overrides=[*overrides, f"train.seed={seed}"])
    return {"seed": seed, "student": report["student"]["metrics"]["digits"]["top1"],
            "cache_bytes": report["teacher_cache"]["bytes"],
            "seconds": round(time.perf_counter() - start, 1)}


def paired_difference(rows: list[dict[str, Any]], reference: list[dict[str, Any]],
                      margin: float) -> dict[str, Any]:
    """Mean top-1 difference ``rows - reference`` over the seeds both hold, its
    ``CONFIDENCE`` t-interval and the equivalence verdict against ``± margin``."""
    from scipy import stats

    base = {r["seed"]: r["student"] for r in reference}
    diffs = [r["student"] - base[r["seed"]] for r in rows if r["seed"] in base]
    mean = statistics.mean(diffs)
    if len(diffs) > 1:
        half = (stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1) * statistics.stdev(diffs)
                / len(diffs) ** 0.5)
    else:  # one seed: no spread, nothing can be decided
        half = float("inf")
    low, high = mean - half, mean + half
    verdict = ("met" if -margin <= low and high <= margin
               else "missed" if high < -margin or low > margin else "undecided")
    return {"value": mean, "low": low, "high": high, "seeds": len(diffs), "target": margin,
            "verdict": verdict, "met": verdict == "met"}


def verdicts(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The targets, each from the figures."""
    rows = list(results.items())  # the rows of variants(), in order
    (_, live), (_, fp32), (_, fp16) = rows[:3]
    ratio = fp32[0]["cache_bytes"] / fp16[0]["cache_bytes"]
    compared = {f"{label.split(',')[0]} within 0.5 point of live teachers (for comparison; "
                "the target is on the first)": paired_difference(runs, live, WITHIN_LIVE)
                for label, runs in rows[3:]}
    return {
        "stored views within 0.5 point of live teachers": paired_difference(fp32, live,
                                                                             WITHIN_LIVE),
        "float16 cache smaller than float32": {"value": ratio, "target": SMALLER,
                                               "verdict": "met" if ratio >= SMALLER
                                               else "missed", "met": ratio >= SMALLER},
        "float16 cache within 0.3 point of float32": paired_difference(fp16, fp32,
                                                                       WITHIN_FP32),
        **compared}


def markdown(results: dict[str, list[dict[str, Any]]], checks: dict[str, dict[str, Any]],
             views: int) -> str:
    seeds = [r["seed"] for r in next(iter(results.values()))]
    lines = ["## Stored augmented views (teacher cache under augmentation)", "",
             f"kd on examples/digits (random shifts on), each row over {len(seeds)} seeds "
             f"({_seed_list(seeds)}); "
             f"`train.teacher_cache_views: {views}` draws {views} augmentations of every "
             "transfer image once, caches the teachers' outputs on exactly those images, and "
             "each epoch trains on one of them per image.", "",
             "| teachers | student top-1 (mean ± sd) | min – max | cache | run time (median) |",
             "|---|---|---|---|---|"]
    for label, runs in results.items():
        top1 = [r["student"] for r in runs]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        size = runs[0]["cache_bytes"]
        lines.append(f"| {label} | {100 * statistics.mean(top1):.1f}% ± {100 * spread:.1f} | "
                     f"{100 * min(top1):.1f} – {100 * max(top1):.1f} | {size / 2**20:.2f} MiB | "
                     f"{statistics.median(r['seconds'] for r in runs):.1f} s |")
    lines += ["", f"| target | measured (mean difference per seed, {100 * CONFIDENCE:.0f}% "
              "interval) | verdict |", "|---|---|---|"]
    for label, check in checks.items():
        shown = (f"{check['value']:.2f}x" if "smaller" in label
                 else f"{100 * check['value']:+.2f} points ({100 * check['low']:+.2f} to "
                 f"{100 * check['high']:+.2f})")
        lines.append(f"| {label} | {shown} | {check['verdict']} |")
    lines += ["", "An accuracy target is met when the whole interval lies within its margin, "
              "missed when it lies wholly outside, undecided otherwise (the seeds' count "
              "was fixed before measuring)."]
    return "\n".join(lines)


def _seed_list(seeds: list[int]) -> str:
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"{seeds[0]}–{seeds[-1]}" if contiguous and len(seeds) > 3 else ", ".join(map(str, seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(DEFAULT_SEEDS)))
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
