"""Images/s of a KD amalgamation of two ResNet-18 teachers at 32x32 on the CPU:
kamal without the teacher cache, kamal with it (epochs 2+), and a plain hand-written PyTorch
loop computing the same losses. Each variant runs in its own process (peak RSS is per
variant); medians over repeats and the ratios to the plain loop are printed.

    python benchmarks/speed.py [--repeats 3] [--epochs 3] [--samples 256]
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
from pathlib import Path

import yaml


def make_teachers(folder: Path) -> list[Path]:
    """Two randomly initialised ResNet-18 teachers (digits 0-4 / 5-9) as model repos."""
    import torch

    from kamal import ClassificationTask, InputSpec, KamalModel, save_model_repo

    repos = []
    for seed, classes in ((0, "01234"), (1, "56789")):
        torch.manual_seed(seed)
        model = KamalModel("resnet18", [ClassificationTask(f"t{seed}", list(classes))],
                           InputSpec(1, (32, 32)), {"small_input": True})
        repos.append(save_model_repo(model, folder / f"teacher{seed}"))
    return repos


def write_config(folder: Path, teachers: list[Path], epochs: int, cache: str) -> Path:
    config = {
        "teachers": [{"path": str(t)} for t in teachers],
        "student": {"architecture": "resnet18", "architecture_kwargs": {"small_input": True}},
        "algorithm": {"name": "kd"},
        "data": {"transfer": {"dataset": "digits", "split": "transfer", "size": 32}},
        "train": {"epochs": epochs, "batch_size": 64, "device": "cpu", "teacher_cache": cache,
                  "log_every": 1000},
    }
    path = folder / f"speed-{cache}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_kamal(folder: Path, teachers: list[Path], epochs: int, cache: str) -> list[float]:
    """Seconds per epoch of `kamal amalgamate`."""
    from kamal import amalgamate

    out = folder / f"run-{cache}-{time.monotonic_ns()}"
    amalgamate(write_config(folder, teachers, epochs, cache), out, progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records if r.get("event") == "epoch"]


def run_plain(teachers: list[Path], epochs: int) -> list[float]:
    """The same KD, written as a plain PyTorch loop (same merge, loss, optimizer, schedule)."""
    import math

    import torch
    from torch.utils.data import DataLoader

    from kamal import LogitMerger, load_teacher
    from kamal.data.digits import build_digits
    from kamal.models import KamalModel, merge_tasks

    loaded = [load_teacher(p.name, p) for p in teachers]
    data = build_digits("transfer", size=32)
    student = KamalModel("resnet18", merge_tasks(loaded), loaded[0].input_spec,
                         {"small_input": True})
    merger = LogitMerger(loaded, student.tasks)
    merger.calibrate(loaded, [data.images[i:i + 256] for i in range(0, len(data), 256)])
    task = student.tasks[0]
    loader = DataLoader(data.images, batch_size=64, shuffle=True, drop_last=True)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    seconds = []
    for _ in range(epochs):
        student.train()
        start = time.perf_counter()
        for images in loader:
            with torch.no_grad():
                merged = merger([t.model(images) for t in loaded])[task.name]
            loss = task.distill_loss(student(images)[task.name], merged, 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def child(variant: str, folder: Path, epochs: int) -> None:
    teachers = [folder / "teacher0", folder / "teacher1"]
    if variant == "plain":
        seconds = run_plain(teachers, epochs)
    else:
        seconds = run_kamal(folder, teachers, epochs, "off" if variant == "kamal-off" else "memory")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.epochs)
        return
    from kamal.data.digits import build_digits

    samples = len(build_digits("transfer")) // 64 * 64  # drop_last
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_teachers(folder)
        results: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeats):
            for variant in ("plain", "kamal-off", "kamal-cache"):
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--folder",
                                       str(folder), "--epochs", str(args.epochs)],
                                      capture_output=True, text=True, check=True)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                entry = results.setdefault(variant, {"ips": [], "rss": []})
                later = result["seconds"][1:]  # epochs 2+ (the cache is built before epoch 1)
                entry["ips"] += [samples / s for s in later]
                entry["rss"].append(result["rss_mb"])
    plain = statistics.median(results["plain"]["ips"])
    print(f"KD, 2 ResNet-18 teachers -> ResNet-18 student, 32x32, batch 64, CPU, "
          f"{args.repeats} repeats x epochs 2-{args.epochs}")
    print(f"{'variant':<14} {'images/s':>9} {'vs plain':>9} {'peak RSS MB':>12}")
    for variant, entry in results.items():
        ips = statistics.median(entry["ips"])
        print(f"{variant:<14} {ips:>9.1f} {ips / plain:>8.2f}x {max(entry['rss']):>12.0f}")


if __name__ == "__main__":
    main()
