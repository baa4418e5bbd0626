"""Does memory grow with the dataset? Peak RSS and time to the first training step of the
same amalgamation on a small and a large folder of 224 px JPEGs.

Two random-weight small-cnn teachers (classes 0-4 and 5-9, 224 px) and a small-cnn
student; one epoch over an ``image-folder`` of generated non-square JPEGs, each run in its
own process (peak RSS is that process's ``ru_maxrss``). The target (issue 21): the large
run's peak within 200 MB of the small one's. Writes the "data_path" section of
docs/benchmarks.md and key of docs/benchmarks.json.

    python benchmarks/data_path.py                 # 200 and 4000 images
    python benchmarks/data_path.py --sizes 50 400  # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

TARGET_MB = 200
SIZE = 224


def make_images(folder: Path, count: int) -> None:
    """``count`` random 224x280 RGB JPEGs (non-square: the folder crops their centre)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (SIZE, SIZE + 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)


def make_teachers(folder: Path) -> list[Path]:
    """Two random-weight 224 px small-cnn teachers, saved as model repos."""
    import torch

    from kamal import ClassificationTask, InputSpec, KamalModel, save_model_repo

    repos = []
    for first in (0, 5):
        torch.manual_seed(first)
        task = ClassificationTask(f"digits-{first}-{first + 4}", [str(c) for c in range(first, first + 5)])
        model = KamalModel("small-cnn", [task], InputSpec(3, (SIZE, SIZE)), {"width": 8})
        repos.append(save_model_repo(model, folder / task.name))
    return repos


def run(images: Path, teachers: list[Path], work: Path, batch: int) -> dict[str, float]:
    """One amalgamation in a child process: its peak RSS and seconds to the first step."""
    config = {
        "teachers": [{"path": str(t)} for t in teachers],
        "student": {"architecture": "small-cnn", "architecture_kwargs": {"width": 8},
                    "task_names": {"classification": "digits"}},
        # the data path is measured: the one-pass merge, the loader in this process
        "algorithm": {"name": "kd", "merge": "standardize"},
        "data": {"transfer": {"dataset": "image-folder", "root": str(images), "size": SIZE},
                 "workers": 0},
        "train": {"epochs": 1, "batch_size": batch, "teacher_cache": "off", "seed": 0},
    }
    path = work / f"{images.name}.json"
    path.write_text(json.dumps(config))
    code = ("import json, resource, sys, kamal\n"
            f"report = kamal.amalgamate({str(path)!r}, {str(work / images.name)!r}, progress=False)\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "print(json.dumps({'peak_mb': peak, **report['timing']}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[200, 4000],
                        metavar=("SMALL", "LARGE"), help="images in the two folders")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kamal-data-path-") as tmp:
        work = Path(tmp)
        teachers = make_teachers(work / "teachers")
        results = {}
        for count in args.sizes:
            folder = work / f"images-{count}"
            make_images(folder, count)
            results[count] = run(folder, teachers, work, args.batch_size)
            print(f"{count:>6} images: peak RSS {results[count]['peak_mb']:.0f} MB, first step "
                  f"after {results[count]['seconds_to_first_step']:.1f} s")
    small, large = args.sizes
    growth = results[large]["peak_mb"] - results[small]["peak_mb"]
    verdict = "met" if growth <= TARGET_MB else "missed"
    lines = ["## Data path: memory and time to the first step", "",
             f"One kd epoch over an `image-folder` of {SIZE}x{SIZE + 56} JPEGs (centre-cropped to "
             f"{SIZE} px), two random-weight {SIZE} px small-cnn teachers, teacher cache off, "
             f"batch {args.batch_size}; each run in its own process.", "",
             "| images | peak RSS MB | seconds to first step |", "|---|---|---|"]
    lines += [f"| {count} | {r['peak_mb']:.0f} | {r['seconds_to_first_step']:.1f} |"
              for count, r in results.items()]
    lines += ["", f"- {large} images within {TARGET_MB} MB of {small}: **{verdict}** "
                  f"({growth:+.0f} MB)."]
    print("\n".join(lines[-1:]))
    _report.update("data_path", "\n".join(lines),
                   {"runs": {str(k): v for k, v in results.items()}, "growth_mb": growth,
                    "target_mb": TARGET_MB, "verdict": verdict})


if __name__ == "__main__":
    main()
