"""Model repos on disk: ``config.json`` + ``model.safetensors`` + ``README.md``.

Weights are read only through safetensors and loaded strictly: a missing, unexpected or
mis-shaped tensor is an error, never a silent partial load. The architecture named in
``config.json`` must be registered: a downloaded file cannot make kamal run code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .atomic import atomic_save_tensors, atomic_write_bytes
from .errors import KamalError, ModelRepoError
from .interfaces import InputSpec, Student, Teacher

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


def save_model_repo(model: Student, folder: str | Path, card: str | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a model repo in ``folder`` (created; files replaced atomically)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {**model.config(), **(extra_config or {})}
    atomic_save_tensors(folder / WEIGHTS_FILE, state)
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    if card is not None:
        atomic_write_bytes(folder / CARD_FILE, card.encode())
    return folder


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_repo_config(folder: str | Path) -> dict[str, Any]:
    """Parse and sanity-check ``config.json`` of a model repo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelRepoError(f"model repo '{folder}' does not exist (expected a folder with "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ModelRepoError(f"model repo '{folder}' has no {name}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ModelRepoError(f"{folder / CONFIG_FILE} is not valid JSON: {exc}") from None
    missing = [k for k in ("architecture", "tasks", "input") if k not in config]
    if missing:
        raise ModelRepoError(f"{folder / CONFIG_FILE} lacks {', '.join(missing)}; is this a kamal "
                             "model repo?")
    return config


def load_model(folder: str | Path) -> Student:
    """Build the network of a model repo and load its weights strictly."""
    from .models import KamalModel, task_from_dict
    from .weights import load_weights

    folder = Path(folder)
    config = read_repo_config(folder)
    try:
        tasks = [task_from_dict(t) for t in config["tasks"]]
        model = KamalModel(config["architecture"], tasks, InputSpec.from_dict(config["input"]),
                           config.get("architecture_kwargs") or {})
    except KamalError as exc:
        raise ModelRepoError(f"{folder}: {exc}") from None
    kwargs = config.get("architecture_kwargs") or ""
    load_weights(model, folder / WEIGHTS_FILE, f"architecture '{config['architecture']}' {kwargs}")
    return model


def load_teacher(name: str, folder: str | Path, source: dict[str, Any] | None = None) -> Teacher:
    """A frozen :class:`Teacher` from a local model repo, with the weights' sha256 recorded."""
    folder = Path(folder)
    model = load_model(folder)
    source = dict(source or {"path": str(folder)})
    source["sha256"] = sha256_of(folder / WEIGHTS_FILE)
    return Teacher(name, model, source)
