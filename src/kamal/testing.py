"""Conformance kit for amalgamator plugins (also a pytest plugin: fixture ``kamal_check``).

``check_amalgamator(MyAmalgamator, workdir)`` trains two tiny digits teachers in-process (no
downloads, cached per process), then checks the contract an amalgamator must meet:

1. its name is not one the core reserves; its ``Config`` validates with defaults only, and
   every field is documented;
2. on one batch, every loss is a finite scalar that back-propagates into the student;
3. a short amalgamation through the real engine finishes and writes a report;
4. the student saves as a model repo and reloads with identical outputs;
5. a run interrupted mid-way and resumed ends with the same student as an uninterrupted run.

Each failure raises :class:`ConformanceError` with a message naming the broken rule.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import yaml

_TEACHER_CACHE: dict[tuple[str, Path], list[Path]] = {}
_SHARED_DIR: list[Path] = []  # one process-wide folder for teachers made without a folder


class ConformanceError(AssertionError):
    """An amalgamator breaks the plugin contract; the message says which rule."""


def make_tiny_teachers(folder: str | Path | None = None, same_architecture: bool = True,
                       size: int = 8) -> list[Path]:
    """Train two tiny digits teachers (classes 0-4 and 5-9) and return their model repos.

    With ``same_architecture`` both are ``small-cnn``; otherwise the second is ``small-vgg``.
    Takes a few seconds on a CPU; results are cached per process and folder (without a
    folder: in one temporary folder per process, shared by all checks).
    """
    from .supervised import train

    if folder is None:
        if not _SHARED_DIR:
            import atexit
            import shutil
            import tempfile

            _SHARED_DIR.append(Path(tempfile.mkdtemp(prefix="kamal-tiny-teachers-")))
            atexit.register(shutil.rmtree, _SHARED_DIR[0], ignore_errors=True)
        folder = _SHARED_DIR[0]
    folder = Path(folder)
    key = ("same" if same_architecture else "different", folder.resolve())
    if key in _TEACHER_CACHE and all(p.exists() for p in _TEACHER_CACHE[key]):
        return _TEACHER_CACHE[key]
    archs = ["small-cnn", "small-cnn" if same_architecture else "small-vgg"]
    repos = []
    for arch, classes in zip(archs, ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), strict=True):
        name = f"tiny-{arch}-{classes[0]}-{classes[-1]}"
        config = {
            "model": {"architecture": arch, "architecture_kwargs": {"width": 8},
                      "task": f"digits-{classes[0]}-{classes[-1]}"},
            "data": {"train": {"dataset": "digits", "split": "train", "classes": classes,
                               "size": size}},
            "train": {"epochs": 4, "batch_size": 32, "optimizer": {"lr": 0.005},
                      "device": "cpu"},
        }
        run_dir = folder / name
        if not (run_dir / "model" / "config.json").exists():
            path = folder / f"{name}.yaml"
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config))
            train(path, run_dir, progress=False)
        repos.append(run_dir / "model")
    _TEACHER_CACHE[key] = repos
    return repos


def default_student(width: int = 8) -> dict[str, Any]:
    """The ``student`` config section the kit uses unless told otherwise."""
    return {"architecture": "small-cnn", "architecture_kwargs": {"width": width},
            "task_names": {"classification": "digits"}}


def write_run_config(path: str | Path, teachers: list[Path], algorithm: dict[str, Any],
                     epochs: int = 2, size: int = 8, student: dict[str, Any] | None = None) -> Path:
    """A small digits amalgamation config using ``teachers``; returns its path."""
    config = {
        "teachers": [{"name": Path(t).parent.name, "path": str(Path(t).resolve())}
                     for t in teachers],
        "student": student or default_student(),
        "algorithm": algorithm,
        "data": {"transfer": {"dataset": "digits", "split": "transfer", "size": size},
                 "eval": {"dataset": "digits", "split": "test", "size": size}},
        "train": {"epochs": epochs, "batch_size": 64, "device": "cpu", "seed": 0},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _ensure_registered(cls: type) -> Any:
    """Register ``cls`` in-process when its name is not already registered to it."""
    from .hookspecs import hookimpl
    from .plugins import get_registry, register_plugin

    entries = get_registry().entries("amalgamators")
    if cls.name in entries and entries[cls.name].load() is cls:
        return None
    plugin = types.SimpleNamespace(
        register_amalgamators=hookimpl(lambda register: register(cls.name, cls)))
    plugin_name = f"kamal-testing-{cls.name}"
    register_plugin(plugin, plugin_name)
    return plugin_name


def _check_name(cls: type) -> None:
    from .plugins import CORE_PLUGIN, get_registry

    entry = get_registry().entries("amalgamators").get(cls.name)
    if entry is not None and entry.plugin == CORE_PLUGIN and entry.load() is not cls:
        raise ConformanceError(f"{cls.__name__}.name '{cls.name}' is a name the kamal core "
                               "reserves; choose another name")


def _check_config(cls: type) -> Any:
    try:
        config = cls.Config(name=cls.name)
    except Exception as exc:
        raise ConformanceError(f"{cls.__name__}.Config does not validate with defaults only: "
                               f"{exc}") from exc
    undocumented = [n for n, f in cls.Config.model_fields.items()
                    if n != "name" and not f.description]
    if undocumented:
        raise ConformanceError(f"{cls.__name__}.Config fields without a description: "
                               f"{', '.join(undocumented)}")
    return config


def _check_losses(cls: type, config: Any, teachers: list[Path], workdir: Path,
                  student_config: dict[str, Any]) -> None:
    import torch

    from .data.digits import build_digits
    from .data.views import image_batches
    from .interfaces import StudentSpec
    from .repo import load_teacher
    from .step import build_batch

    loaded = [load_teacher(p.parent.name, p) for p in teachers]
    cls.check_teachers(loaded)
    algo = cls(config, loaded, StudentSpec(student_config["architecture"],
                                           student_config.get("architecture_kwargs") or {},
                                           student_config.get("task_names") or {}))
    student = algo.build_student()
    transfer = build_digits("transfer", size=8)
    images = next(image_batches(transfer, batch_size=32))
    algo.setup(student, [images])
    losses = algo.losses(build_batch(algo, images))
    if not isinstance(losses, dict) or not losses:
        raise ConformanceError(f"{cls.__name__}.losses must return a non-empty dict of tensors")
    for name, value in losses.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConformanceError(f"loss '{name}' must be a scalar tensor, got {value!r:.80}")
        if not torch.isfinite(value).all():
            raise ConformanceError(f"loss '{name}' is not finite ({float(value.detach())})")
        if not value.requires_grad:
            raise ConformanceError(f"loss '{name}' has no gradient: it does not depend on any "
                                   "trainable parameter")
    sum(losses.values()).backward()
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()):
        raise ConformanceError("the losses do not back-propagate into the student")
    _check_saveable(student, workdir)


def _check_saveable(student: Any, workdir: Path) -> None:
    import torch

    from .repo import load_model, save_model_repo

    folder = workdir / "student-save-check"
    try:
        save_model_repo(student, folder)
        reloaded = load_model(folder)
    except Exception as exc:  # any failure here is the plugin's: report it as the contract
        raise ConformanceError(f"the student cannot be saved and reloaded as a model repo "
                               f"({type(exc).__name__}: {exc}); build it from a registered "
                               "architecture (kamal.KamalModel) or implement Student.config()") from exc
    x = torch.rand(2, student.input_spec.channels, *student.input_spec.size)
    student.eval()
    with torch.no_grad():
        before, after = student(x), reloaded.eval()(x)
    if any(not torch.allclose(before[k], after[k], atol=1e-6) for k in before):
        raise ConformanceError("the student reloaded from its model repo gives different outputs")


def check_amalgamator(cls: type, workdir: str | Path,
                      algorithm_options: dict[str, Any] | None = None,
                      same_architecture: bool = True, epochs: int = 2,
                      student: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the conformance checks on amalgamator class ``cls``; returns the short run's report.

    ``student`` replaces the default ``student`` config section (a small-cnn), for algorithms
    that build their own student architecture.
    """
    student = {"task_names": {"classification": "digits"}, **student} if student else default_student()
    from .errors import KamalError
    from .plugins import unregister_plugin
    from .repo import load_model
    from .run import amalgamate

    workdir = Path(workdir)
    _check_name(cls)
    config = _check_config(cls)
    if algorithm_options:
        config = cls.Config(name=cls.name, **algorithm_options)
    teachers = make_tiny_teachers(None, same_architecture)
    temporary = _ensure_registered(cls)
    try:
        _check_losses(cls, config, teachers, workdir, student)
        algorithm = {"name": cls.name, **(algorithm_options or {})}
        path = write_run_config(workdir / f"{cls.name}.yaml", teachers, algorithm, epochs,
                                student=student)
        try:
            report = amalgamate(path, workdir / "run", progress=False)
        except KamalError as exc:
            raise ConformanceError(f"a short amalgamation with {cls.name} failed: {exc}") from exc
        student = workdir / "run" / "student"
        try:
            reloaded = load_model(student)
        except KamalError as exc:
            raise ConformanceError(f"the student cannot be reloaded as a model repo: {exc}") from exc
        _check_resume(path, workdir, reloaded)
        return report
    finally:
        if temporary:
            unregister_plugin(temporary)


def _check_resume(path: Path, workdir: Path, finished: Any) -> None:
    import torch

    from .errors import Interrupted
    from .repo import load_model
    from .run import amalgamate

    out = workdir / "resumed"
    try:
        amalgamate(path, out, progress=False, interrupt_after_steps=5)
    except Interrupted:
        pass
    else:
        raise ConformanceError("the run was not interruptible (did amalgamate() bypass trainer.fit?)")
    amalgamate(path, out, progress=False, resume=True)
    resumed = load_model(out / "student").state_dict()
    for key, value in finished.state_dict().items():
        if not torch.allclose(value.float(), resumed[key].float(), atol=1e-6):
            raise ConformanceError(f"interrupted + resumed run differs from an uninterrupted one "
                                   f"(first at '{key}'): resume does not restore all state")


# --- pytest plugin ---------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for users
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def kamal_check(tmp_path: Path):
        """``kamal_check(MyAmalgamator, **options)`` runs :func:`check_amalgamator` in tmp_path."""

        def run(cls: type, **kwargs: Any) -> dict[str, Any]:
            return check_amalgamator(cls, tmp_path, **kwargs)

        return run
