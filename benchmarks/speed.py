"""Training speed: a KD amalgamation of two ResNet-18 teachers at 32x32 on the CPU.

Variants, each in its own process (so peak RSS is per variant), repeated ``--repeats`` times
in rotating order: ``plain``, a hand-written PyTorch loop computing the same losses (kamal's
calibrated ``standardize`` merge written out and checked against ``LogitMerger``, KL at T=1,
Adam, cosine schedule); ``kamal-off``, ``kamal amalgamate`` without the teacher cache;
``kamal-cache``, with the in-memory cache; optionally ``kamal-off-contiguous``, kamal
without cache and without channels-last teachers. Images/s come from the median time
between consecutive step starts in epochs 2+ (epoch 1 warms up; the cache is built before
it). Then the teacher-execution micro-benchmark: the same teachers back to back,
channels-last, and as one vmapped call (kamal.teachers).

Rewrites the "speed" and "teachers" sections of docs/benchmarks.md (and their JSON keys).

    python benchmarks/speed.py [--repeats 3] [--epochs 2] [--samples 128] [--student resnet18]
                               [--min-steps 30]
                               [--variants plain kamal-off kamal-cache kamal-off-contiguous]

``--min-steps``: at least that many timed steps per variant over all repeats (``--epochs``
is raised until there are). Each verdict is decided by the measurements: **met** when the
ratio of the variant's lower quartile to plain's upper quartile reaches the target,
**missed** when even upper over lower quartile does not, otherwise **undecided** (the
spread straddles the target).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

SIZE, BATCH = 32, 32
VARIANTS = ("plain", "kamal-off", "kamal-cache", "kamal-off-contiguous")
DEFAULT_VARIANTS = VARIANTS[:3]
STUDENTS = {"resnet18": {"small_input": True}, "small-cnn": {"width": 32}}


def make_teachers(folder: Path) -> list[Path]:
    """Two randomly initialised ResNet-18 teachers (digits 0-4 / 5-9) as model repos."""
    import torch

    from kamal import ClassificationTask, InputSpec, KamalModel, save_model_repo

    repos = []
    for seed, classes in ((0, "01234"), (1, "56789")):
        torch.manual_seed(seed)
        model = KamalModel("resnet18", [ClassificationTask(f"t{seed}", list(classes))],
                           InputSpec(1, (SIZE, SIZE)), {"small_input": True})
        repos.append(save_model_repo(model, folder / f"teacher{seed}"))
    return repos


def make_images(folder: Path, samples: int) -> int:
    """The first ``samples`` digits transfer images as PNG files (an ``image-folder``)."""
    import torch
    from torchvision.io import write_png

    from kamal.data.digits import build_digits

    images = build_digits("transfer").images[:samples]
    root = folder / "images"
    root.mkdir()
    for i, image in enumerate(images):
        write_png((image * 255).round().to(torch.uint8), str(root / f"{i:05d}.png"))
    return len(images)


def _data_ref(folder: Path) -> dict[str, Any]:
    return {"dataset": "image-folder", "root": str(folder / "images"), "size": SIZE, "channels": 1}


def _step_seconds(starts: list[tuple[int, float]]) -> list[float]:
    """Seconds between consecutive step starts of the same epoch, epochs 2+ (1 warms up)."""
    return [b - a for (ea, a), (eb, b) in zip(starts, starts[1:], strict=False)
            if ea == eb and ea > 0]


@contextmanager
def step_clock() -> Iterator[list[tuple[int, float]]]:
    """While active, each call of kamal's step function appends ``(epoch, perf_counter())``
    to the yielded list: the benchmarks time kamal's own loop from outside it."""
    from kamal.step import AmalgamationStep

    starts: list[tuple[int, float]] = []
    original = AmalgamationStep.__call__

    def timed(self: Any, data: Any, info: Any) -> Any:
        starts.append((info.epoch, time.perf_counter()))
        return original(self, data, info)

    AmalgamationStep.__call__ = timed  # type: ignore[method-assign]  # a benchmark's probe
    try:
        yield starts
    finally:
        AmalgamationStep.__call__ = original  # type: ignore[method-assign]


def run_kamal(folder: Path, epochs: int, cache: str, student: str) -> dict[str, Any]:
    """Step times of `kamal amalgamate` (a clock at each call of its step function)."""
    from kamal import amalgamate

    config = {
        "teachers": [{"path": str(folder / "teacher0")}, {"path": str(folder / "teacher1")}],
        "student": {"architecture": student, "architecture_kwargs": STUDENTS[student]},
        # the loop's cost is measured: the one-pass merge, and the loader in this process as
        # the plain loop's (no workers)
        "algorithm": {"name": "kd", "merge": "standardize"},
        "data": {"transfer": _data_ref(folder), "workers": 0},
        "train": {"epochs": epochs, "batch_size": BATCH, "device": "cpu", "teacher_cache": cache,
                  "log_every": 1000},
    }
    path = folder / f"speed-{cache}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = folder / f"run-{path.stem}"
    with step_clock() as starts:
        report = amalgamate(path, out, progress=False)
    return {"steps": _step_seconds(starts), "cache_bytes": report["teacher_cache"]["bytes"]}


def run_plain(folder: Path, epochs: int, student_arch: str) -> dict[str, Any]:
    """The same KD as a plain loop: step times and the teachers' share of each step."""
    import math

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from kamal import KamalModel, load_teacher
    from kamal.data.base import build_dataset
    from kamal.models import merge_tasks

    torch.manual_seed(0)
    teachers = [load_teacher(p.name, p) for p in (folder / "teacher0", folder / "teacher1")]
    models = [t.model for t in teachers]
    ref = _data_ref(folder)
    dataset = build_dataset(ref.pop("dataset"), None, ref)  # decodes one image per item
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # for the calibration
    student = KamalModel(student_arch, merge_tasks(teachers), teachers[0].input_spec,
                         STUDENTS[student_arch])

    # calibration of the standardize merge: each teacher's confidence (max - mean logit)
    with torch.no_grad():
        conf = [torch.cat([_confidence(m(images[i:i + 256])[m.tasks[0].name])
                           for i in range(0, len(images), 256)]).double() for m in models]
    mean = torch.stack([c.mean() for c in conf]).float()
    std = torch.stack([c.std().clamp_min(1e-6) for c in conf]).float()

    def merged(logits: list[torch.Tensor]) -> torch.Tensor:
        # disjoint classes (0-4, 5-9): placing each teacher's block is a concatenation
        return torch.cat([torch.log_softmax(x, 1) + ((_confidence(x) - mean[i]) / std[i])[:, None]
                          for i, x in enumerate(logits)], 1)

    _check_merge(teachers, student, images[:BATCH], merged, mean, std)
    # the plain loop reads the folder as kamal does: a DataLoader over the lazy dataset
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    starts: list[tuple[int, float]] = []
    teacher_seconds: list[float] = []
    for epoch in range(epochs):
        student.train()
        for batch, _ in loader:
            starts.append((epoch, time.perf_counter()))
            with torch.no_grad():
                target = merged([m(batch)[m.tasks[0].name] for m in models])
            teacher_seconds.append(time.perf_counter() - starts[-1][1])
            out = student(batch)[student.tasks[0].name]
            loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(target, 1),
                            reduction="batchmean", log_target=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    steps = _step_seconds(starts)
    shares = []
    durations = iter(steps)
    for (ea, _), (eb, _), spent in zip(starts, starts[1:], teacher_seconds, strict=False):
        if ea == eb and ea > 0:
            shares.append(spent / next(durations))
    return {"steps": steps, "teacher_share": shares}


def _confidence(logits):
    return logits.max(1).values - logits.mean(1)


def _check_merge(teachers, student, images, merged, mean, std) -> None:
    """The written-out merge equals kamal's LogitMerger (so both loops compute one loss)."""
    import torch

    from kamal import LogitMerger

    merger = LogitMerger(teachers, student.tasks)
    merger.confidence_mean.copy_(mean)  # the same calibration as the plain loop's
    merger.confidence_std.copy_(std)
    with torch.no_grad():
        outs = [t.model(images) for t in teachers]
        mine = merged([o[t.tasks[0].name] for o, t in zip(outs, teachers, strict=True)])
        theirs = merger(outs)[student.tasks[0].name]
    if not torch.allclose(mine, theirs, atol=1e-5):
        raise SystemExit("the plain loop's merge differs from kamal's LogitMerger")


def child(variant: str, folder: Path, epochs: int, student: str) -> None:
    start = time.perf_counter()
    if variant == "plain":
        result = run_plain(folder, epochs, student)
    elif variant == "kamal-off-contiguous":  # the loop alone: teachers as the plain loop runs them
        import kamal.teachers

        kamal.teachers.CHANNELS_LAST_FASTER_ON = frozenset()
        result = run_kamal(folder, epochs, "off", student)
    else:
        result = run_kamal(folder, epochs, "off" if variant == "kamal-off" else "memory", student)
    result["wall"] = time.perf_counter() - start
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def verdict(variant: list[float], plain: list[float], target: float) -> tuple[str, float, float]:
    """met / missed / undecided for ``variant >= target x plain`` (images/s), with the
    interquartile bounds of the ratio."""
    v_lo, v_hi = _quartiles(variant)
    p_lo, p_hi = _quartiles(plain)
    low, high = v_lo / p_hi, v_hi / p_lo
    word = "met" if low >= target else "missed" if high < target else "undecided"
    return word, low, high


def epochs_for(min_steps: int, samples: int, repeats: int, epochs: int) -> int:
    """Epochs so that epochs 2+ hold ``min_steps`` timed steps over all repeats."""
    per_epoch = max(samples // BATCH - 1, 1)  # gaps between consecutive step starts
    return max(epochs, 1 + -(-min_steps // (per_epoch * repeats)))


def training_speed(args: argparse.Namespace, folder: Path, samples: int) -> tuple[str, dict]:
    results: dict[str, dict[str, list[float]]] = {}
    variants = list(args.variants)
    for repeat in range(args.repeats):
        shift = repeat % len(variants)  # rotate the order: load changes hit every variant
        for variant in variants[shift:] + variants[:shift]:
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--folder",
                                   str(folder), "--epochs", str(args.epochs), "--student",
                                   args.student], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            entry = results.setdefault(variant, {"ips": [], "rss": [], "wall": [], "share": [],
                                                 "cache": []})
            entry["ips"] += [BATCH / s for s in result["steps"]]
            entry["rss"].append(result["rss_mb"])
            entry["wall"].append(result["wall"])
            entry["share"] += result.get("teacher_share", [])
            entry["cache"].append(result.get("cache_bytes", 0))
    plain = statistics.median(results["plain"]["ips"])
    share = statistics.median(results["plain"]["share"])
    rows = []
    summary = {}
    for variant in variants:
        entry = results[variant]
        ips = statistics.median(entry["ips"])
        summary[variant] = {"images_per_s": ips, "vs_plain": ips / plain,
                            "peak_rss_mb": max(entry["rss"]), "run_wall_s": entry["wall"],
                            "cache_bytes": max(entry["cache"]), "images_per_s_all": entry["ips"]}
        cache = f"{max(entry['cache']) / 2**10:.1f} KiB" if max(entry["cache"]) else "–"
        q1, q3 = _quartiles(entry["ips"])
        summary[variant]["quartiles"] = [q1, q3]
        rows.append(f"| {variant} | {len(entry['ips'])} | {ips:.1f} | {q1:.1f}–{q3:.1f} | "
                    f"{min(entry['ips']):.1f}–{max(entry['ips']):.1f} | "
                    f"{ips / plain:.2f}x | {max(entry['rss']):.0f} | {cache} | "
                    f"{statistics.median(entry['wall']):.0f} |")
    ceiling = 1 / (1 - share)
    lines = [
        "## Training speed",
        "",
        f"KD amalgamation, two ResNet-18 teachers (random weights, `small_input`) -> "
        f"{args.student} student, 1x{SIZE}x{SIZE} images ({samples} digits transfer images as "
        f"an image folder), batch {BATCH}, Adam, CPU. {args.repeats} repeats (variant order "
        "rotated), each variant in its own process (peak RSS is that process's). Images/s = "
        f"batch / median seconds between consecutive step starts in epochs 2-{args.epochs} "
        "(epoch 1 warms up; the cache is built before it), so each step's data loading, "
        "teachers, student, backward and optimizer count, and kamal's per-epoch checkpoint, "
        "setup and final report do not ('run wall' has everything). kamal runs its teachers "
        "channels-last on the CPU (see Teacher execution); `kamal-off-contiguous`, where "
        "measured, turns that off: kamal's loop against the plain one with identical teacher "
        "calls.",
        "",
        "| variant | timed steps | images/s (median) | interquartile | range | vs plain "
        "(medians) | peak RSS MB | cache | run wall s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    verdicts = {}
    plain_ips = results["plain"]["ips"]
    if "kamal-off" in summary:
        off = summary["kamal-off"]["vs_plain"]
        word, low, high = verdict(results["kamal-off"]["ips"], plain_ips, 0.95)
        verdicts["kamal-off >= 0.95x plain"] = word
        alone = (f"; with teachers run exactly as the plain loop runs them, "
                 f"{summary['kamal-off-contiguous']['vs_plain']:.2f}x"
                 if "kamal-off-contiguous" in summary else "")
        lines.append(f"- kamal without cache >= 0.95x plain: **{word}** (medians {off:.2f}x, "
                     f"interquartile {low:.2f}x–{high:.2f}x{alone}).")
    if "kamal-cache" in summary:
        cached = summary["kamal-cache"]["vs_plain"]
        word, low, high = verdict(results["kamal-cache"]["ips"], plain_ips, 2.0)
        verdicts["kamal-cache >= 2x plain"] = word
        why = (f"even free teacher outputs would give about {ceiling:.2f}x, below 2x: 2x needs "
               "teachers taking at least half of the step" if ceiling < 2 else
               f"free teacher outputs could give up to {ceiling:.2f}x")
        lines.append(
            f"- kamal with cache >= 2x plain from epoch 2: **{word}** (medians {cached:.2f}x, "
            f"interquartile {low:.2f}x–{high:.2f}x). In the plain loop the teachers take "
            f"{share:.0%} of a step (median), so {why}.")
    return "\n".join(lines), {"student": args.student, "samples": samples, "batch": BATCH,
                              "repeats": args.repeats, "epochs": args.epochs,
                              "teacher_share_of_plain_step": share,
                              "cache_ceiling_vs_plain": ceiling, "variants": summary,
                              "verdicts": verdicts}


def teacher_execution(repeats: int) -> tuple[str, dict]:
    """Teachers back to back, channels-last, vmapped: median ms per batch of 64."""
    import torch

    from kamal import ClassificationTask, InputSpec, KamalModel
    from kamal.interfaces import Teacher
    from kamal.teachers import TeacherRunner

    cases = [("2x ResNet-18 (small_input)", "resnet18", {"small_input": True}, 32, repeats),
             ("2x small-cnn w16", "small-cnn", {"width": 16}, 16, repeats * 10),
             ("2x small-cnn w32", "small-cnn", {"width": 32}, 32, repeats * 5)]
    modes = {"back to back": ("off", "off"), "channels-last": ("off", "on"),
             "vmapped": ("on", "off")}
    rows, data = [], {}
    for label, arch, kwargs, size, reps in cases:
        runners = {}
        for mode, (batch, channels_last) in modes.items():
            teachers = []
            for seed, classes in ((0, "01234"), (1, "56789")):
                torch.manual_seed(seed)
                teachers.append(Teacher(f"t{seed}", KamalModel(
                    arch, [ClassificationTask(f"t{seed}", list(classes))],
                    InputSpec(1, (size, size)), kwargs)))
            runners[mode] = TeacherRunner(teachers, [[], []], batch, channels_last)
        images = torch.rand(BATCH, 1, size, size)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for runner in runners.values():
            runner(images)  # plan, check, warm up
            runner(images)
        for _ in range(reps):  # interleaved, so load changes hit every mode alike
            for mode, runner in runners.items():
                start = time.perf_counter()
                runner(images)
                times[mode].append(time.perf_counter() - start)
        ms = {mode: 1000 * statistics.median(v) for mode, v in times.items()}
        base = ms["back to back"]
        data[label] = {"size": size, "repeats": reps, "median_ms": ms}
        rows.append(f"| {label}, {size}x{size} | " + " | ".join(
            f"{ms[m]:.1f} ({base / ms[m]:.2f}x)" for m in modes) + " |")
    lines = [
        "## Teacher execution",
        "",
        f"Two teachers on a batch of {BATCH} 1-channel images, CPU, no grad: median ms per batch "
        "(speed-up over back to back), modes interleaved. `vmapped` = one call over stacked "
        "weights (`torch.func.stack_module_state` + `functional_call` + `vmap`); "
        "`channels-last` = back to back with weights and input channels-last.",
        "",
        "| teachers | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
        *rows,
        "",
        "`train.batch_teachers: auto` uses the vmapped call only on device types listed in "
        "`kamal.teachers.BATCHED_FASTER_ON` and `train.teacher_channels_last: auto` "
        "channels-last only on those in `CHANNELS_LAST_FASTER_ON`. " + _teacher_verdict(data),
    ]
    return "\n".join(lines), {"cases": data}


def _teacher_verdict(data: dict[str, Any]) -> str:
    """Whether the CPU entries of those two sets agree with these figures."""
    from kamal.teachers import BATCHED_FASTER_ON, CHANNELS_LAST_FASTER_ON

    def faster(mode: str) -> list[bool]:
        return [case["median_ms"][mode] < case["median_ms"]["back to back"]
                for case in data.values()]

    out = []
    for mode, chosen, setting in (("vmapped", BATCHED_FASTER_ON, "BATCHED_FASTER_ON"),
                                  ("channels-last", CHANNELS_LAST_FASTER_ON,
                                   "CHANNELS_LAST_FASTER_ON")):
        wins = faster(mode)
        measured = ("faster in every case" if all(wins) else
                    "slower in every case" if not any(wins) else
                    f"faster in {sum(wins)} of {len(wins)} cases")
        agree = ("cpu" in chosen) == all(wins) if all(wins) or not any(wins) else None
        state = "lists" if "cpu" in chosen else "leaves out"
        out.append(f"{mode} was {measured} here and `{setting}` {state} `cpu`: "
                   + ("consistent." if agree else "**inconsistent**: update it."
                      if agree is not None else "mixed evidence."))
    return " ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128, help="transfer images (<= 539)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS,
                        help="plain must be one of them")
    parser.add_argument("--student", choices=sorted(STUDENTS), default="resnet18")
    parser.add_argument("--min-steps", type=int, default=30,
                        help="timed steps per variant over all repeats (raises --epochs)")
    parser.add_argument("--skip-training", action="store_true", help="teacher execution only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "plain" not in args.variants:
        parser.error("--variants: the ratios need plain")
    if args.child:
        child(args.child, Path(args.folder), args.epochs, args.student)
        return
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_teachers(folder)
            samples = make_images(folder, args.samples) // BATCH * BATCH  # drop_last
            args.epochs = epochs_for(args.min_steps, samples, args.repeats, args.epochs)
            text, data = training_speed(args, folder, samples)
        _report.update("speed", text, data)
        print(text, flush=True)
    text, data = teacher_execution(max(args.repeats, 3) * 2 + 1)
    _report.update("teachers", text, data)
    print(text)


if __name__ == "__main__":
    main()
