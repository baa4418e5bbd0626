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
from .version import CORE_DISTRIBUTION, PLUGIN_API, PLUGIN_API_RELEASES, core_version

ENTRY_POINT_GROUP = "kamal"
DEFAULT_PLUGINS = ("kamal.builtins",)
CORE_PLUGIN = "kamal"  # the name the core's own hook module is registered under


@dataclass
class PluginInfo:
    """What ``kamal list-plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    incompatible: bool = False  # built for another plugin API: not loaded

    @property
    def status(self) -> str:
        """``"ok"``, ``"error"`` or ``"incompatible"``."""
        if self.incompatible:
            return "incompatible"
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
        except Exception as exc:  # isolate: one broken plugin must not break kamal
            _record_failure(info, f"failed to load {ep.value}: {type(exc).__name__}: {exc}")
            continue
        problem = api_mismatch(getattr(module, "KAMAL_PLUGIN_API", None))
        if problem:
            info.incompatible = True
            _record_failure(info, problem)
            continue
        try:
            pm.register(module, name=ep.name)
        except Exception as exc:
            _record_failure(info, f"failed to register {ep.value}: {type(exc).__name__}: {exc}")


def api_mismatch(declared: Any) -> str | None:
    """Why a plugin declaring ``KAMAL_PLUGIN_API = declared`` cannot load (None: it can).

    A plugin that declares nothing is assumed to fit (plugins written before API versions).
    """
    if declared is None:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        wanted = SpecifierSet(str(declared))
    except InvalidSpecifier:
        major = int(PLUGIN_API.split(".")[0])
        return (f"KAMAL_PLUGIN_API = {declared!r} is not a version range; write e.g. "
                f"'>={major},<{major + 1}'")
    if wanted.contains(PLUGIN_API):
        return None
    fitting = [f"{release} (API {api})" for api, release in PLUGIN_API_RELEASES.items()
               if wanted.contains(api)]
    return (f"built for kamal plugin API {declared}, but this {CORE_DISTRIBUTION} "
            f"{core_version()} provides API {PLUGIN_API}; not loaded. Core versions that fit: "
            f"{', '.join(fitting) or 'none released yet'}; or install a version of the plugin "
            f"built for API {PLUGIN_API}")


def _fill_registry(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> Registry:
    registry = Registry()
    trace = os.environ.get("KAMAL_TRACE_PLUGINS", "") not in ("", "0")
    reserved: list[tuple[PluginInfo, str]] = []  # (plugin, message): it reused a core name
    for kind in KINDS:
        caller = getattr(pm.hook, f"register_{kind}")
        # the core first: its names are reserved, whatever order plugins load in
        impls = sorted(caller.get_hookimpls(), key=lambda i: i.plugin_name != CORE_PLUGIN)
        for impl in impls:
            info = infos[impl.plugin_name]
            info.hooks.append(f"register_{kind}")

            def register(name: str, target: Any, _info: PluginInfo = info, _kind: str = kind) -> None:
                if trace:
                    print(f"kamal: {_info.name} ({_info.distribution}) registers {KIND_NOUNS[_kind]} "
                          f"'{name}' -> {target if isinstance(target, str) else repr(target)}",
                          file=sys.stderr)
                core = registry.entries(_kind).get(name)
                if core is not None and core.plugin == CORE_PLUGIN and _info.name != CORE_PLUGIN:
                    reserved.append((_info, f"registers {KIND_NOUNS[_kind]} '{name}', a name the "
                                     f"kamal core reserves; the plugin must use another name "
                                     f"(the core's '{name}' stays in use)"))
                    return
                registry.add(_kind, name, target, _info.name, _info.distribution)
                _info.provides.setdefault(_kind, []).append(name)

            try:
                impl.function(register=register)
            except Exception as exc:
                _record_failure(info, f"register_{kind} failed: {type(exc).__name__}: {exc}")
    for info, message in reserved:
        if info.error is None:
            _record_failure(info, message)
    for kind in KINDS:
        for entry in registry.entries(kind).values():
            if entry.clashes:
                owners = [entry.distribution, *entry.clashes]
                message = f"{KIND_NOUNS[kind]} '{entry.name}' is registered by {' and '.join(owners)}"
                for info in infos.values():
                    if info.distribution in owners and info.error is None:
                        _record_failure(info, message)
    registry.broken = {info.distribution: info.error for info in infos.values() if info.error}
    return registry


def _load() -> None:
    pm = pluggy.PluginManager("kamal")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    import importlib

    for module_name in DEFAULT_PLUGINS:
        infos[CORE_PLUGIN] = PluginInfo(CORE_PLUGIN, CORE_DISTRIBUTION, core_version())
        pm.register(importlib.import_module(module_name), name=CORE_PLUGIN)
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
