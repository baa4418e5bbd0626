"""Run folders: where a run writes, and where its model repo is found again.

A run folder holds ``checkpoints/``, ``metrics.jsonl``, ``report.json``, ``config.yaml`` and
the model repo it produced: ``student/`` (``kamal amalgamate``) or ``model/``
(``kamal train``). ``kamal evaluate`` and ``kamal push`` accept a run folder or a model repo.
"""

from __future__ import annotations

from pathlib import Path

from . import distributed
from .errors import KamalError
from .repo import CONFIG_FILE

RUN_MARKERS = ("report.json", "checkpoints", "metrics.jsonl")
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
