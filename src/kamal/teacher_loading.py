"""Teachers from the ``teachers:`` section of a run config: a local folder or a Hub repo, in
any registered teacher format (``format:``, or the one format that recognises the repo)."""

from __future__ import annotations

import ctypes
import gc
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TeacherRef
from .errors import ConfigError, KamalError, ModelRepoError, RegistryError
from .formats import TeacherFormat
from .interfaces import Teacher
from .plugins import get_registry
from .repo import sha256_of
from .tasks.classification import NamedClassesTask

if TYPE_CHECKING:
    from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def resolve_teacher(ref: TeacherRef, base_dir: Path, index: int) -> Teacher:
    """Load teacher ``index`` of a run; relative paths resolve against ``base_dir`` (the
    config file's folder). Errors name the config path ``teachers.<index>``."""
    key = f"teachers.{index}"
    try:
        if ref.hub is not None:
            from .hub import HubError, download_model_repo

            try:
                resolved = download_model_repo(ref.hub, ref.revision)
            except HubError as exc:
                raise KamalError(f"{key}.hub: {exc}") from None
            folder = resolved.local_dir
            source = {"hub": ref.hub, "revision": resolved.commit,
                      "requested_revision": ref.revision}
            if resolved.from_cache:  # the Hub was unreachable: the cache's commit of the ref
                source["revision_from"] = "cache"
        else:
            folder = (base_dir / ref.path).resolve() if ref.path else base_dir
            source = {"path": str(folder)}
        model, fmt = load_repo(folder, ref.display_name, ref.classes, ref.format, key)
        if ref.classes is not None:  # recorded, so the student's teachers load again as used
            source["classes"] = ref.classes
        if ref.rename:
            rename_classes(model, ref.rename, f"{key}.rename")
            source["rename"] = dict(ref.rename)
        return Teacher(ref.display_name, model,
                       {**source, "format": fmt, "sha256": weights_digest(folder)})
    except KamalError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(key) else f"{key}: {message}") from None


def load_teachers(refs: Sequence[TeacherRef], base_dir: Path, lazy: bool) -> list[Teacher]:
    """Every teacher of a run, one at a time, each with its :attr:`~Teacher.loader`. With
    ``lazy`` each is released as soon as it is loaded and checked (its weights come back
    when it is first used), so loading holds one teacher's weights at a time."""
    teachers = []
    for index, ref in enumerate(refs):
        teacher = resolve_teacher(ref, base_dir, index)
        teacher.loader = weights_loader(ref, base_dir, index, teacher)
        if lazy:
            teacher.release(lazy=True)
            return_freed_memory()
        teachers.append(teacher)
    return teachers


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's malloc_trim:
    freed tensors of a few MB otherwise stay in the process's resident memory)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


def weights_loader(ref: TeacherRef, base_dir: Path, index: int,
                   teacher: Teacher) -> Callable[[], nn.Module]:
    """How to load ``teacher``'s network again, from the same files (a Hub teacher at the
    commit it was loaded at); files that changed since are an error, never silently used."""
    if ref.hub is not None:
        ref = ref.model_copy(update={"revision": teacher.source["revision"]})

    def load() -> nn.Module:
        import torch

        # building the network draws initial weights: a load during training must not move
        # the run's random state (its augmentations and order, and a resume, depend on it)
        with torch.random.fork_rng(devices=[]):
            loaded = resolve_teacher(ref, base_dir, index)
        if loaded.source.get("sha256") != teacher.source.get("sha256"):
            raise KamalError(f"teachers.{index}: the weights of '{teacher.name}' changed on disk "
                             "during the run (sha256 differs); the report needs the teacher the "
                             "student learned from: rerun, or set train.release_teachers: false")
        return loaded.model
    return load


def rename_classes(model: Any, mapping: dict[str, str], key: str) -> None:
    """Rename the classes of ``model``'s named-class tasks in place (``{old: new}``); a name
    the model does not have, or a rename that makes two classes one, is an error."""
    tasks = [t for t in model.tasks if isinstance(t, NamedClassesTask)]
    known = [c for t in tasks for c in t.classes]
    unknown = [name for name in mapping if name not in known]
    if unknown:
        raise ConfigError(f"{key}: the teacher has no class {', '.join(map(repr, unknown))}; its "
                          f"classes are {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    for task in tasks:
        renamed = [mapping.get(c, c) for c in task.classes]
        if len(set(renamed)) != len(renamed):
            raise ConfigError(f"{key}: renaming makes two classes of task '{task.name}' one "
                              f"({', '.join(sorted({c for c in renamed if renamed.count(c) > 1}))})")
        if all(c in mapping for c in task.classes):
            task.guessed_names = False  # every name now comes from the user
        task.classes = renamed


def load_repo(folder: Path, name: str, classes: Any, format_name: str | None,
              key: str = "teacher") -> tuple[Any, str]:
    """The network of the model repo in ``folder`` and the name of its format."""
    if not folder.is_dir():
        raise ModelRepoError(f"model repo '{folder}' does not exist")
    refuse_pickles(folder)
    config = _read_config(folder)
    fmt = choose_format(folder, config, format_name, key)
    try:
        return fmt.load(folder, name, classes), fmt.name
    except KamalError:
        raise
    except ImportError as exc:
        hint = f"; install it: pip install '{fmt.extra}'" if fmt.extra else ""
        raise KamalError(f"the {fmt.name} format needs a package that is not installed "
                         f"({exc}){hint}") from exc
    except Exception as exc:  # a format plugin's bug must not become a raw traceback
        raise KamalError(f"teacher format '{fmt.name}' failed to load '{folder}': "
                         f"{type(exc).__name__}: {exc}") from exc


def choose_format(folder: Path, config: dict[str, Any] | None, format_name: str | None,
                  key: str) -> TeacherFormat:
    """``format_name``'s format, or the one registered format that recognises the repo."""
    registry = get_registry()
    if format_name is not None:
        try:
            return registry.get("teacher_formats", format_name)()
        except RegistryError as exc:
            raise KamalError(f"{key}.format: {exc}") from exc
    claims = []
    for name, entry in sorted(registry.entries("teacher_formats").items()):
        try:
            fmt = registry.get("teacher_formats", name)()
            if fmt.detect(folder, config):
                claims.append(fmt)
        except RegistryError:
            continue  # a broken format plugin is reported by list-plugins; others still work
        except Exception as exc:
            raise KamalError(f"teacher format '{name}' (from {entry.distribution}) failed while "
                             f"recognising '{folder}': {type(exc).__name__}: {exc}; set "
                             f"{key}.format to the repo's format, or fix or remove the plugin") from exc
    if len(claims) == 1:
        return claims[0]
    names = ", ".join(registry.names("teacher_formats"))
    if not claims:
        files = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "no files"
        raise ModelRepoError(f"'{folder}' matches no teacher format ({names}); it holds {files}. "
                             f"Set {key}.format, or install the plugin of its library")
    raise ModelRepoError(f"'{folder}' is claimed by several teacher formats "
                         f"({', '.join(f.name for f in claims)}); set {key}.format to one of them")


def refuse_pickles(folder: Path) -> None:
    """Weights only through safetensors: a repo that has only pickled weights is refused."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelRepoError(
            f"'{folder}' has weights only as pickles ({', '.join(pickles)}), which can run code "
            "when loaded; kamal reads safetensors only. Convert them once where you trust the "
            "file: torch.load(...) then safetensors.torch.save_file(state_dict, "
            "'model.safetensors')")


def weights_digest(folder: Path) -> str:
    """sha256 of ``model.safetensors`` (of the index for sharded weights)."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return sha256_of(folder / name)
    shards = sorted(folder.glob("*.safetensors"))
    return sha256_of(shards[0]) if shards else ""


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ModelRepoError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
