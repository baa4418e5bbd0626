"""Memory of many teachers while the teacher cache fills and once it is complete (issue 16,
part 5).

Eight random-weight small-cnn teachers of about 60 MB each (digits 0-9 at 8 px, each repo
saved and loaded as a user's would be), a small-cnn student, kd with ``merge: standardize``
on the digits transfer split, one epoch, teacher cache in memory. The process's resident
memory (``VmRSS``) is read at every training step by a logger, and its high-water mark
(``VmHWM``) at the first one: the peak of loading the teachers, filling the cache and
calibrating. Two runs, each in its own process: teachers released
(``train.release_teachers: true``, the default: loaded one at a time, freed once each has
filled its cache entry) and kept. The targets, above the process before any model (torch,
kamal and the data loaded: the CUDA build of torch alone is about 500 MB here, so the
budget cannot hold the runtime itself): the peak during training at most the largest
teacher + the student + 300 MB; the peak before training at most that + the cache.

    python benchmarks/teacher_memory.py

Writes the "teacher_memory" key of docs/benchmarks.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

TEACHERS, WIDTH, BUDGET_MB = 8, 410, 300
MB = 2**20

CHILD = """
import json, sys, types
from pathlib import Path

def rss(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

baseline = rss()
import torch
from kamal import Logger, amalgamate
from kamal.hookspecs import hookimpl
from kamal.plugins import register_plugin

torch_loaded = rss()
import kamal.run  # what the run imports, and its data, before any model
from kamal.data.digits import build_digits

build_digits("transfer", size=8)
ready = rss()
seen, setup = [], []

class RssLogger(Logger):
    def log_scalars(self, scalars, step):
        if not seen:
            setup.append(rss("VmHWM"))
        seen.append(rss())

register_plugin(types.SimpleNamespace(register_loggers=hookimpl(
    lambda register: register("rss", RssLogger))), "rss-probe")
report = amalgamate(sys.argv[1], sys.argv[2], progress=False, overrides=sys.argv[3:])
print(json.dumps({"baseline": baseline, "torch": torch_loaded, "ready": ready,
                  "setup_peak": setup[0], "training_peak": max(seen),
                  "training_steps": len(seen), "cache_bytes": report["teacher_cache"]["bytes"],
                  "student_params": report["student"]["params"]}))
"""


def make_teachers(folder: Path) -> list[Path]:
    """Random-weight small-cnn teachers, saved as model repos."""
    import torch

    from kamal import ClassificationTask, InputSpec, save_model_repo
    from kamal.models.base import KamalModel

    repos = []
    for i in range(TEACHERS):
        torch.manual_seed(i)
        task = ClassificationTask(f"digits-{i}", [str(c) for c in range(10)])
        model = KamalModel("small-cnn", [task], InputSpec(channels=1, size=(8, 8)),
                           {"width": WIDTH})
        save_model_repo(model, folder / f"teacher{i}")
        repos.append(folder / f"teacher{i}")
    return repos


def config(folder: Path, repos: list[Path]) -> Path:
    import yaml

    path = folder / "memory.yaml"
    path.write_text(yaml.safe_dump({
        "teachers": [{"name": repo.name, "path": str(repo)} for repo in repos],
        "student": {"architecture": "small-cnn", "architecture_kwargs": {"width": 24},
                    "task_names": {"classification": "digits"}},
        "algorithm": {"name": "kd", "merge": "standardize"},
        "data": {"transfer": {"dataset": "digits", "split": "transfer", "size": 8}},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "teacher_cache": "memory",
                  "loggers": ["rss"], "log_every": 1}}, sort_keys=False))
    return path


def measure(path: Path, out: Path, release: bool) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out),
                           f"train.release_teachers={str(release).lower()}"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_verdict(runs: dict[str, dict[str, Any]], sizes: list[int],
                   phase: str = "training") -> dict[str, Any]:
    """A target from the figures: the growth of the peak of ``phase`` (``training``, or
    ``setup``: loading, filling the cache, calibrating) with released teachers at most the
    largest teacher + the student + ``BUDGET_MB`` (+ the cache for ``setup``, which builds
    it)."""
    released = runs["released"]
    limit = max(sizes) + released["student_params"] * 4 + BUDGET_MB * MB
    if phase == "setup":
        limit += released["cache_bytes"]
    grown = released[f"{phase}_peak"] - released["ready"]
    return {"value_mb": round(grown / MB, 1), "target_mb": round(limit / MB, 1),
            "met": grown <= limit}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repos = make_teachers(folder)
        sizes = [(repo / "model.safetensors").stat().st_size for repo in repos]
        path = config(folder, repos)
        runs = {label: measure(path, folder / label, release)
                for label, release in (("released", True), ("kept", False))}
    student = runs["released"]["student_params"] * 4
    verdicts = {phase: memory_verdict(runs, sizes, phase) for phase in ("setup", "training")}
    lines = ["## Teachers out of memory", "",
             f"{TEACHERS} random-weight small-cnn teachers of {max(sizes) / MB:.1f} MB each "
             f"({sum(sizes) / MB:.0f} MB in all), a small-cnn student of {student / MB:.2f} MB, "
             "kd on the digits transfer split, one epoch, teacher cache in memory; resident "
             "memory read at every training step, its peak before training (loading the "
             "teachers, filling the cache, calibrating) at the first; each run in its own "
             "process.", "",
             "| teachers | peak RSS before training (above the process before any model) | "
             "peak RSS while training (above) | cache | steps read |", "|---|---|---|---|---|"]
    for label, run in runs.items():
        lines.append(f"| {label} | {run['setup_peak'] / MB:.0f} MB "
                     f"({(run['setup_peak'] - run['ready']) / MB:.0f} MB) | "
                     f"{run['training_peak'] / MB:.0f} MB "
                     f"({(run['training_peak'] - run['ready']) / MB:.0f} MB) | "
                     f"{run['cache_bytes'] / MB:.2f} MB | {run['training_steps']} |")
    lines += ["", f"The process before any model: {runs['released']['ready'] / MB:.0f} MB "
              f"({runs['released']['torch'] / MB:.0f} MB of it with only torch imported). "
              f"Targets, with teachers released: the growth before training at most the "
              f"largest teacher + the student + the cache + {BUDGET_MB} MB = "
              f"{verdicts['setup']['target_mb']:.0f} MB: "
              f"**{'met' if verdicts['setup']['met'] else 'missed'}** "
              f"({verdicts['setup']['value_mb']:.0f} MB); while training, at most the largest "
              f"teacher + the student + {BUDGET_MB} MB = {verdicts['training']['target_mb']:.0f}"
              f" MB: **{'met' if verdicts['training']['met'] else 'missed'}** "
              f"({verdicts['training']['value_mb']:.0f} MB)."]
    text = "\n".join(lines)
    print(text)
    _report.update("teacher_memory", text, {"runs": runs, "teacher_bytes": sizes,
                                            "student_bytes": student, "verdicts": verdicts})


if __name__ == "__main__":
    main()
