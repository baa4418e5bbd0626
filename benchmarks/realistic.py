"""Training speed at real size: two ResNet-50 teachers at 224 px amalgamated into a
ResNet-18 student, from a folder of JPEGs read with random crops and flips (issue 16).

Variants, each run ``--repeats`` times in an order rotated every repeat, each timed by a
clock at the start of every step. Each epoch 2+ (epoch 1 warms up) gives one rate: its
images over the time between its first and last step start. A mean within the epoch,
not a median step: where the data path limits, batches arrive in bursts (the workers'
prefetch queue) and the median gap is near zero while the mean is the true rate.

* ``loader``: the DataLoader alone (decode, random crop, resize), no model: what the data
  path can deliver;
* ``student-only``: a hand-written loop training the student on the same batches against
  fixed targets: the limit once teacher outputs are free;
* ``plain``: a hand-written KD loop (teachers under no_grad, KL to their concatenated
  log-probabilities, Adam);
* ``kamal-off``: ``kamal amalgamate``, teachers live (``teacher_cache: off``);
* ``kamal-views``: ``kamal amalgamate`` with ``teacher_cache_views: K`` (the teachers' outputs
  on K stored views per image, filled before epoch 1).

Every loop reads the same image folder through the same DataLoader settings (the workers
``data.workers: auto`` picks). Verdicts come from the figures (interquartile bounds of each
ratio, as benchmarks/speed.py): kamal-off >= 0.97x plain, kamal-views >= 0.9x
student-only, loader >= 2x student-only.

    python benchmarks/realistic.py [--images 320] [--batch 32] [--epochs 5] [--views 2]
                                   [--repeats 2]
                                   [--device cpu] [--precision fp32] [--compile]
                                   [--key realistic]

On a GPU, benchmarks/gpu.sh runs it at batch 256 with bf16 and compile and writes the key
"realistic_gpu". Writes its key of docs/benchmarks.json and its section of benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from speed import step_clock, verdict  # noqa: E402

SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOADER_MARGIN = 2.0  # the loader this much faster than the student: the step is the limit
TARGETS = {"kamal-off vs plain": ("kamal-off", "plain", 0.97),
           "kamal-views vs student-only": ("kamal-views", "student-only", 0.9),
           "loader vs student-only": ("loader", "student-only", LOADER_MARGIN)}


def epoch_rates(starts: list[tuple[int, float]], batch: int) -> list[float]:
    """Images/s of each epoch 2+: the batches between its first and last step start over
    that time (``starts`` holds ``(epoch, perf_counter())`` at each step start)."""
    by_epoch: dict[int, list[float]] = {}
    for epoch, moment in starts:
        if epoch > 0:
            by_epoch.setdefault(epoch, []).append(moment)
    return [batch * (len(times) - 1) / (times[-1] - times[0])
            for times in by_epoch.values() if len(times) > 1]


def make_images(root: Path, count: int) -> None:
    """JPEGs of 256x320 (and 320x256) with smooth content and fine noise, as photos decode."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    root.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        h, w = (256, 320) if i % 2 else (320, 256)
        coarse = torch.rand(1, 3, h // 32, w // 32, generator=generator)
        image = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        image = (image + 0.08 * torch.randn(3, h, w, generator=generator)).clamp(0, 1)
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)


def make_teachers(folder: Path) -> list[Path]:
    """Two random-weight ResNet-50 teachers (classes 0-4 / 5-9) at 224 px, as model repos."""
    import torch

    from kamal import ClassificationTask, InputSpec, KamalModel, save_model_repo

    repos = []
    for seed, classes in ((0, "01234"), (1, "56789")):
        torch.manual_seed(seed)
        model = KamalModel("resnet50", [ClassificationTask(f"t{seed}", list(classes))],
                           InputSpec(3, (SIZE, SIZE), MEAN, STD, resize_to=(256,)))
        repos.append(save_model_repo(model, folder / f"teacher{seed}"))
    return repos


def _data(folder: Path) -> dict[str, Any]:
    return {"dataset": "image-folder", "root": str(folder / "images"), "size": SIZE,
            "augment": True}


def _dataset(folder: Path) -> Any:
    from kamal.data.base import build_dataset

    ref = _data(folder)
    return build_dataset(ref.pop("dataset"), None, ref)


def _workers(folder: Path) -> int:
    """The worker count ``data.workers: auto`` gives the image folder on this machine."""
    from kamal.data.loading import resolve_workers

    return resolve_workers("auto", _dataset(folder))


def _loader(folder: Path, batch: int, device: Any) -> Any:
    """The DataLoader every hand-written loop reads: the dataset and workers kamal uses."""
    from torch.utils.data import DataLoader

    from kamal.data.loading import loader_options, resolve_workers

    dataset = _dataset(folder)
    options = loader_options(resolve_workers("auto", dataset), device, dataset.augmented)
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **options)


def _hand_loop(args: argparse.Namespace, folder: Path, teachers: bool) -> list[float]:
    """student-only (fixed targets) or plain KD (teachers live): the rates of epochs 2+."""
    import torch
    import torch.nn.functional as F

    from kamal import KamalModel, load_teacher
    from kamal.models import merge_tasks

    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded = [load_teacher(p.name, p) for p in (folder / "teacher0", folder / "teacher1")]
    models = [t.model.to(device) for t in loaded]
    student = KamalModel("resnet18", merge_tasks(loaded), loaded[0].input_spec).to(device)
    forward = torch.compile(student) if args.compile else student
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    fixed = torch.randn(args.batch, 10, device=device).log_softmax(1)
    starts: list[tuple[int, float]] = []
    for epoch in range(args.epochs):
        for images, _ in _loader(folder, args.batch, device):
            starts.append((epoch, time.perf_counter()))
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if teachers:
                    with torch.no_grad():
                        target = torch.cat([m(images)[m.tasks[0].name].float().log_softmax(1)
                                            for m in models], 1)
                else:
                    target = fixed
                out = forward(images)[student.tasks[0].name].float()
                loss = F.kl_div(out.log_softmax(1), target, reduction="batchmean",
                                log_target=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    _sync(device)
    return epoch_rates(starts, args.batch)


def _loader_only(args: argparse.Namespace, folder: Path) -> list[float]:
    import torch

    device = torch.device(args.device)
    starts: list[tuple[int, float]] = []
    for epoch in range(args.epochs):
        for images, _ in _loader(folder, args.batch, device):
            starts.append((epoch, time.perf_counter()))
            images.to(device, non_blocking=True)
    _sync(device)
    return epoch_rates(starts, args.batch)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _kamal(args: argparse.Namespace, folder: Path, views: int) -> dict[str, Any]:
    from kamal import amalgamate

    cache = {"teacher_cache": "memory", "teacher_cache_views": views} if views else {
        "teacher_cache": "off"}
    config = {
        "teachers": [{"path": str(folder / "teacher0")}, {"path": str(folder / "teacher1")}],
        "student": {"architecture": "resnet18"},
        "algorithm": {"name": "kd", "merge": "standardize"},
        "data": {"transfer": _data(folder)},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "device": args.device,
                  "precision": args.precision, "compile": args.compile,
                  "calibration_images": 2 * args.batch, "log_every": 1000, **cache}}
    path = folder / f"kamal-{views}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    with step_clock() as starts:
        report = amalgamate(path, folder / f"run-{views}-{time.monotonic_ns()}", progress=False)
    return {"rates": epoch_rates(starts, args.batch), "cache_bytes": report["teacher_cache"]["bytes"],
            "seconds_to_first_step": report["timing"]["seconds_to_first_step"],
            "wall": round(time.perf_counter() - started, 1)}


def measure(args: argparse.Namespace, folder: Path,
            save: Callable[[dict[str, dict[str, Any]]], None]) -> dict[str, dict[str, Any]]:
    """Every variant ``args.repeats`` times, in an order rotated each repeat (a drift of the
    machine over the run then falls on every variant alike); epoch rates pooled. ``save``
    gets the results after every run, so a run stopped by a time limit keeps its figures."""
    variants = {"loader": lambda: {"rates": _loader_only(args, folder)},
                "student-only": lambda: {"rates": _hand_loop(args, folder, False)},
                "plain": lambda: {"rates": _hand_loop(args, folder, True)},
                "kamal-off": lambda: _kamal(args, folder, 0),
                "kamal-views": lambda: _kamal(args, folder, args.views)}
    names = list(variants)
    results: dict[str, dict[str, Any]] = {name: {"rates": []} for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            run = variants[name]()
            rates = run.pop("rates")
            results[name]["rates"] += rates
            results[name].setdefault("runs", []).append(run)
            print(f"{name} (repeat {repeat + 1}): epochs 2+ at "
                  f"{', '.join(f'{r:.0f}' for r in rates)} images/s", flush=True)
            save(results)
    return results


def verdicts(results: dict[str, dict[str, Any]], batch: int) -> dict[str, dict[str, Any]]:
    """Each target of ``TARGETS`` decided by the epoch rates (those with both sides
    measured)."""
    checks = {}
    for label, (variant, reference, target) in TARGETS.items():
        if not (results[variant]["rates"] and results[reference]["rates"]):
            continue
        word, low, high = verdict(results[variant]["rates"], results[reference]["rates"],
                                  target)
        checks[label] = {"target": target, "low": low, "high": high, "verdict": word}
    return checks


def markdown(args: argparse.Namespace, results: dict[str, dict[str, Any]],
             checks: dict[str, dict[str, Any]], device: str, workers: int) -> str:
    lines = [f"## Training at real size: two ResNet-50 teachers at 224 px ({device})", "",
             f"{args.images} JPEGs (256x320) read with random crops and flips by {workers} "
             f"DataLoader workers (`data.workers: auto`), batch {args.batch}, {args.precision}"
             f"{', compiled student' if args.compile else ''}; ResNet-18 student, kd "
             f"(`merge: standardize`). One rate per epoch 2-{args.epochs} of each of "
             f"{args.repeats} runs per variant (images between the epoch's first and last "
             "step over that time), the variants in an order rotated every run.", "",
             "| variant | images/s (median epoch) | interquartile | epochs | note |",
             "|---|---|---|---|---|"]
    views = results["kamal-views"].get("runs", [{"cache_bytes": 0,
                                                  "seconds_to_first_step": 0}])[0]
    notes = {"loader": "the data path alone (decode, crop, resize)",
             "student-only": "student forward + backward, targets free",
             "plain": "hand-written KD loop, teachers live",
             "kamal-off": "kamal, teachers live",
             "kamal-views": f"kamal, {args.views} stored views per image "
                            f"({views['cache_bytes'] / 2**10:.0f} KiB, filled in "
                            f"{views['seconds_to_first_step']:.0f} s before epoch 1)"}
    for name, result in results.items():
        if not result["rates"]:
            lines.append(f"| {name} | not measured (the run stopped first) | | 0 | |")
            continue
        q = statistics.quantiles(result["rates"], n=4, method="inclusive")
        lines.append(f"| {name} | {statistics.median(result['rates']):.1f} | "
                     f"{q[0]:.1f}–{q[2]:.1f} | {len(result['rates'])} | {notes[name]} |")
    lines += ["", "| target | ratio (interquartile) | verdict |", "|---|---|---|"]
    for label, check in checks.items():
        lines.append(f"| {label} ≥ {check['target']}x | {check['low']:.2f}–{check['high']:.2f}x "
                     f"| {check['verdict']} |")
    return "\n".join([*lines, "", limit_sentence(results)])


def limit_sentence(results: dict[str, dict[str, Any]]) -> str:
    """Which stage limits this machine, from the loader's and student-only's median rates:
    student-only reads through the same loader, so it cannot outrun it."""
    loader, student = (results[name]["rates"] for name in ("loader", "student-only"))
    if not (loader and student):
        return "Which stage limits: not measured (the run stopped first)."
    ratio = statistics.median(loader) / statistics.median(student)
    limit = ("the student's step is the limit here (student-only is the ceiling once teacher "
             "outputs are free), not the data path" if ratio >= LOADER_MARGIN else
             "the data path is the limit here, or nearly: student-only training cannot "
             "outrun it, so every row is bounded by the loader; more workers or pre-decoded "
             "images would help before a faster step does")
    return (f"The loader alone delivers {ratio:.1f}x the images/s of student-only training "
            f"(medians): {limit}.")


def stored_markdown(entry: dict[str, Any]) -> str:
    """The Markdown this script makes from a stored run's figures and settings."""
    args = argparse.Namespace(**entry["settings"])
    return markdown(args, entry["results"], verdicts(entry["results"], args.batch),
                    entry["device"], entry["workers"])


def rerender(key: str) -> str:
    """Replace ``key``'s stored Markdown by :func:`stored_markdown` of its figures, keeping
    its stamp (command, date, machine), and re-render the regions."""
    import _regions

    entry = _report.stored(key)
    entry["markdown"] = stored_markdown(entry)
    _report.update_json(key, entry, restamp=False)
    _regions.render_all()
    return entry["markdown"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--key", default="realistic")
    parser.add_argument("--render", action="store_true",
                        help="rebuild --key's stored Markdown from its stored figures (after "
                             "a change of wording); measures nothing")
    args = parser.parse_args()
    if args.render:
        print(rerender(args.key))
        return
    import torch

    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder / "images", args.images)
        make_teachers(folder)
        workers = _workers(folder)

        def save(results: dict[str, dict[str, Any]], final: bool = False) -> str:
            checks = verdicts(results, args.batch)
            text = markdown(args, results, checks, device, workers)
            _report.update(args.key, text, {"results": results, "verdicts": checks,
                                            "device": device, "workers": workers,
                                            "complete": final, "settings": vars(args)})
            return text

        print(save(measure(args, folder, save), final=True))


if __name__ == "__main__":
    main()
