"""Plugin discovery: built-ins and the ``kamal`` entry-point group, through pluggy.

Loading is lazy (first call of :func:`get_registry`), per-plugin isolated (a plugin that
fails to import or register is recorded in :func:`plugin_infos` and skipped) and never
imports torch by itself. Environment switches, as in llm/datasette/pytest:

``KAMAL_LOAD_PLUGINS``     comma list of entry-point names to load (empty: none)
``KAMAL_DISABLE_PLUGINS``  comma list of entry-point names to skip
``KAMAL_TRACE_PLUGINS``    print every name each plugin registers, with its target, to stderr
``KAMAL_STRICT_PLUGINS``   raise on a broken plugin or a name clash instead of recording it
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import RegistryError
from .registry import KIND_NOUNS, KINDS, Registry

ENTRY_POINT_GROUP = "kamal"
DEFAULT_PLUGINS = ("kamal.builtins",)


@dataclass
class PluginInfo:
    """What ``kamal list-plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> str:
        """``"ok"`` or ``"error"``."""
        return "error" if self.error else "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "provides": self.provides,
            "status": self.status,
            "error": self.error,
        }


class _State:
    pm: pluggy.PluginManager | None = None
    registry: Registry | None = None
    infos: dict[str, PluginInfo] = {}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _kamal_version() -> str:
    try:
        return metadata.version("kamal")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _strict() -> bool:
    return os.environ.get("KAMAL_STRICT_PLUGINS", "") not in ("", "0")


def _record_failure(info: PluginInfo, message: str) -> None:
    info.error = message
    if _strict():
        raise RegistryError(f"plugin {info.name} ({info.distribution}): {message}")
    print(f"kamal: plugin {info.name} is broken: {message}", file=sys.stderr)


def _load_entry_points(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    only = _env_list("KAMAL_LOAD_PLUGINS")
    skip = set(_env_list("KAMAL_DISABLE_PLUGINS") or [])
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if (only is not None and ep.name not in only) or ep.name in skip:
            continue
        dist = ep.dist
        info = PluginInfo(ep.name, dist.name if dist else ep.name, dist.version if dist else "?")
        infos[ep.name] = info
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # isolate: one broken plugin must not break kamal
            _record_failure(info, f"failed to load {ep.value}: {type(exc).__name__}: {exc}")


def _fill_registry(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> Registry:
    registry = Registry()
    trace = os.environ.get("KAMAL_TRACE_PLUGINS", "") not in ("", "0")
    for kind in KINDS:
        caller = getattr(pm.hook, f"register_{kind}")
        for impl in caller.get_hookimpls():
            info = infos[impl.plugin_name]
            info.hooks.append(f"register_{kind}")

            def register(name: str, target: Any, _info: PluginInfo = info, _kind: str = kind) -> None:
                if trace:
                    print(f"kamal: {_info.name} ({_info.distribution}) registers {KIND_NOUNS[_kind]} "
                          f"'{name}' -> {target if isinstance(target, str) else repr(target)}",
                          file=sys.stderr)
                registry.add(_kind, name, target, _info.name, _info.distribution)
                _info.provides.setdefault(_kind, []).append(name)

            try:
                impl.function(register=register)
            except Exception as exc:
                _record_failure(info, f"register_{kind} failed: {type(exc).__name__}: {exc}")
    for kind in KINDS:
        for entry in registry.entries(kind).values():
            if entry.clashes:
                owners = [entry.distribution, *entry.clashes]
                message = f"{KIND_NOUNS[kind]} '{entry.name}' is registered by {' and '.join(owners)}"
                for info in infos.values():
                    if info.distribution in owners and info.error is None:
                        _record_failure(info, message)
    return registry


def _load() -> None:
    pm = pluggy.PluginManager("kamal")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    import importlib

    for module_name in DEFAULT_PLUGINS:
        infos["kamal"] = PluginInfo("kamal", "kamal", _kamal_version())
        pm.register(importlib.import_module(module_name), name="kamal")
    _load_entry_points(pm, infos)
    pm.check_pending()  # a misspelled hook name fails loudly
    _State.registry = _fill_registry(pm, infos)
    _State.pm, _State.infos = pm, infos


def get_registry() -> Registry:
    """The registry of every loaded plugin (plugins load on first call)."""
    if _State.registry is None:
        _load()
    assert _State.registry is not None
    return _State.registry


def plugin_infos() -> list[PluginInfo]:
    """One :class:`PluginInfo` per plugin, built-ins first, broken ones included."""
    get_registry()
    return list(_State.infos.values())


def register_plugin(module: Any, name: str) -> None:
    """Register an in-process plugin object (tests, notebooks) and rebuild the registry."""
    get_registry()
    assert _State.pm is not None
    _State.pm.register(module, name=name)
    _State.infos[name] = PluginInfo(name, name, "local")
    for info in _State.infos.values():
        info.hooks, info.provides = [], {}
    _State.registry = _fill_registry(_State.pm, _State.infos)


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    assert _State.pm is not None
    _State.pm.unregister(name=name)
    _State.infos.pop(name, None)
    for info in _State.infos.values():
        info.hooks, info.provides, info.error = [], {}, None
    _State.registry = _fill_registry(_State.pm, _State.infos)
