"""The hooks a kamal plugin implements. All take a single ``register`` callable.

``register(name, target)`` records one named component. ``target`` is either the object
itself or a lazy reference ``"module:attribute"`` that kamal imports only when the name is
first used, so that ``kamal list-plugins`` never imports torch or the plugin's heavy code.
Names are global per kind: two distributions registering the same name is an error.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("kamal")
hookimpl = pluggy.HookimplMarker("kamal")



class Register(Protocol):
    """The callable every hook receives: ``register(name, target)`` records one component.

    ``target`` is the object or a lazy ``"module:attr"`` reference to it.
    """

    def __call__(self, name: str, target: Any) -> None: ...


@hookspec
def register_amalgamators(register: Register) -> None:
    """Register amalgamation algorithms: ``register("cfl", "my_pkg.cfl:CFLAmalgamator")``.

    The target is a subclass of :class:`kamal.Amalgamator`; the name is what a run config
    selects with ``algorithm.name``.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register task kinds: ``register("classification", "kamal.tasks:ClassificationTask")``.

    The target is a subclass of :class:`kamal.Task`; the name is the ``kind`` stored in a
    model repo's ``config.json``.
    """


@hookspec
def register_architectures(register: Register) -> None:
    """Register network architectures: ``register("small-cnn", "pkg.models:SMALL_CNN")``.

    The target is a :class:`kamal.Architecture` (a builder plus its named feature layers).
    Only registered names can be built from a config or a downloaded ``config.json``.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: ``register("digits", "kamal.data.digits:build_digits")``.

    The target is a callable ``(split: str | None, **options) -> kamal.ImageDataset``;
    options come from the ``data`` section of a config and are validated by the callable.
    """


@hookspec
def register_teacher_formats(register: Register) -> None:
    """Register teacher formats: ``register("open-clip", "my_pkg.formats:OpenClipFormat")``.

    The target is a subclass of :class:`kamal.TeacherFormat` (constructed without
    arguments): it recognises a model repo of its library and loads it as a kamal model.
    The name is what a teacher reference selects with ``format:``.
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment trackers: ``register("mlflow", "my_pkg.logger:MLflowLogger")``.

    The target is a subclass of :class:`kamal.Logger` (constructed without arguments); the
    name is what a run config lists in ``train.loggers``.
    """
