"""Run folders: where a run writes, and where its model repo is found again.

A run folder holds ``checkpoints/``, ``metrics.jsonl``, ``report.json``, ``config.yaml`` and
the model repo it produced: ``student/`` (``kamal amalgamate``) or ``model/``
(``kamal train``). ``kamal evaluate`` and ``kamal push`` accept a run folder or a model repo.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import distributed
from .errors import KamalError
from .repo import CONFIG_FILE

if TYPE_CHECKING:
    from .config import RunConfig
    from .interfaces import Student, Teacher

RUN_MARKERS = ("report.json", "checkpoints", "metrics.jsonl")
RESOLVED_CONFIG = "config.yaml"  # the run's config, teacher paths absolute and revisions pinned
# what a resumed run must share with the run it continues (everything else may change:
# train.epochs, the optimizer, data.eval, logging)
FIXED_ON_RESUME = ("algorithm.name", "teachers", "student", "data.transfer")
MODEL_SUBFOLDERS = ("student", "model")  # written by amalgamate / train


def prepare_output(output: str | Path, resume: bool) -> Path:
    """Refuse to overwrite an existing run unless resuming it.

    Every process of a distributed run checks (so all stop with the same error) before the
    main process creates the folder.
    """
    out = Path(output)
    if resume:
        if not (out / "checkpoints" / "latest.safetensors").exists():
            raise KamalError(f"--resume: '{out}' has no checkpoints/latest.safetensors to resume")
    elif out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        raise KamalError(f"output folder '{out}' already holds a run; use --resume to continue "
                         "it or choose another --output")
    distributed.barrier()
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return out


def model_folder(path: str | Path) -> Path:
    """The model repo of a run folder (its ``student/`` or ``model/``), or ``path`` itself
    when it is a model repo."""
    folder = Path(path)
    for sub in MODEL_SUBFOLDERS:
        if (folder / sub / CONFIG_FILE).exists():
            return folder / sub
    if (folder / CONFIG_FILE).exists():
        return folder
    raise KamalError(f"'{path}' is neither a run folder (with student/ or model/) nor a model "
                     f"repo (with {CONFIG_FILE})")


def _lookup(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_resume_matches(out: Path, resolved: dict[str, Any]) -> None:
    """Refuse to ``--resume`` a run with another algorithm, teachers, student or transfer
    data than it was started with; the message lists every difference."""
    recorded_file = out / RESOLVED_CONFIG
    if not recorded_file.exists():
        return
    recorded = yaml.safe_load(recorded_file.read_text()) or {}
    differences = []
    for path in FIXED_ON_RESUME:
        before, now = _lookup(recorded, path), _lookup(resolved, path)
        if path == "teachers" and isinstance(before, list) and isinstance(now, list):
            if len(before) != len(now):
                differences.append(f"teachers: {len(before)} then, {len(now)} now")
                continue
            for i, (old, new) in enumerate(zip(before, now, strict=True)):
                for key in sorted(set(old) | set(new)):
                    if old.get(key) != new.get(key):
                        differences.append(f"teachers.{i}.{key}: {old.get(key)!r} then, "
                                           f"{new.get(key)!r} now")
        elif before != now:
            differences.append(f"{path}: {before!r} then, {now!r} now")
    if differences:
        raise KamalError(f"--resume: {out} was started with another setup; it cannot continue "
                         f"with this config. Differences: {'; '.join(differences)}. Resume with "
                         "the original config (train.epochs, the optimizer, data.eval and logging "
                         "may change), or start a new run with another --output")


def resolved_config(cfg: RunConfig, teachers: list[Teacher], student: Student,
                    base: Path) -> dict[str, Any]:
    """The run's config with teacher revisions pinned and paths absolute (``config.yaml``)."""
    data = cfg.model_dump(exclude_none=True)
    for entry, teacher in zip(data["teachers"], teachers, strict=True):
        if "hub" in entry:
            entry["revision"] = teacher.source["revision"]
        else:
            entry["path"] = str((base / entry["path"]).resolve())
    spec = student.input_spec.to_dict()  # what the student read, resolved and re-runnable
    data["student"]["input"] = {k: v for k, v in spec.items() if k != "channels"}
    return data


def config_notes(teachers: list[Teacher]) -> str:
    """YAML comments that head ``config.yaml``: teachers whose revision came from the local
    Hub cache, and how each teacher read the images."""
    return _cache_notes(teachers) + _input_notes(teachers)


def _input_notes(teachers: list[Teacher]) -> str:
    """YAML comments for ``config.yaml``: how each teacher read the images (from its repo)."""
    return "".join(f"# teachers.{i} '{t.name}' reads {t.input_spec.view.describe()}, mean "
                   f"{list(t.input_spec.mean)}, std {list(t.input_spec.std)}\n"
                   for i, t in enumerate(teachers))


def _cache_notes(teachers: list[Teacher]) -> str:
    """YAML comments for ``config.yaml`` naming teachers whose revision came from the local
    Hub cache (the Hub was unreachable); comments keep the file a valid, re-runnable config."""
    lines = [f"# teachers.{i}: revision {t.source['revision']} came from the local Hub cache "
             f"(the Hub was unreachable when resolving "
             f"'{t.source.get('requested_revision') or 'main'}')\n"
             for i, t in enumerate(teachers) if t.source.get("revision_from") == "cache"]
    return "".join(lines)
