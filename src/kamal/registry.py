"""Named components, one flat registry per kind, filled by the plugin hooks.

Each entry remembers the plugin and distribution that registered it, so clashes and
import failures name who is responsible. Targets given as ``"module:attr"`` strings are
imported on first use only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import RegistryError, did_you_mean

# registry kind (hook ``register_<kind>``) -> what one entry is called in messages
KIND_NOUNS = {
    "amalgamators": "algorithm",
    "tasks": "task kind",
    "architectures": "architecture",
    "datasets": "dataset",
    "loggers": "logger",
    "teacher_formats": "teacher format",
}
KINDS = tuple(KIND_NOUNS)


@dataclass
class Entry:
    """One registered name: where it comes from and what it points to."""

    kind: str
    name: str
    target: Any
    plugin: str
    distribution: str
    clashes: list[str] = field(default_factory=list)

    def load(self) -> Any:
        """Return the registered object, importing a lazy ``"module:attr"`` target once."""
        if self.clashes:
            owners = ", ".join([self.distribution, *self.clashes])
            raise RegistryError(
                f"{KIND_NOUNS[self.kind]} '{self.name}' is registered by several "
                f"distributions ({owners}); uninstall all but one of them."
            )
        if isinstance(self.target, str):
            module_name, _, attr = self.target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split(".") if attr else []:
                    obj = getattr(obj, part)
            except Exception as exc:  # a plugin's import error must name the plugin
                raise RegistryError(
                    f"{KIND_NOUNS[self.kind]} '{self.name}' from {self.distribution} failed "
                    f"to load ({self.target}): {type(exc).__name__}: {exc}"
                ) from exc
            self.target = obj
        return self.target


class Registry:
    """All registered components, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.broken: dict[str, str] = {}  # distribution -> why it failed to load

    def add(self, kind: str, name: str, target: Any, plugin: str, distribution: str) -> None:
        """Record ``name``; a second distribution registering it is recorded as a clash."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"plugin {plugin} registered an {KIND_NOUNS[kind]} with an invalid "
                                f"name {name!r}")
        existing = self._entries[kind].get(name)
        if existing is None:
            self._entries[kind][name] = Entry(kind, name, target, plugin, distribution)
        elif existing.distribution != distribution or existing.plugin != plugin:
            existing.clashes.append(distribution)
        else:
            existing.target = target

    def entries(self, kind: str) -> dict[str, Entry]:
        """All entries of one kind, by name."""
        return dict(self._entries[kind])

    def names(self, kind: str) -> list[str]:
        """Sorted names of one kind."""
        return sorted(self._entries[kind])

    def entry(self, kind: str, name: str) -> Entry:
        """The entry for ``name``, or a :class:`RegistryError` listing what exists."""
        try:
            return self._entries[kind][name]
        except KeyError:
            allowed = self.names(kind)
            message = (
                f"unknown {KIND_NOUNS[kind]} '{name}'.{did_you_mean(name, allowed)} "
                f"Installed: {', '.join(allowed) or 'none'}."
            )
            plugin = f"kamal-plugin-{name}"
            if plugin in self.broken:
                message = (f"unknown {KIND_NOUNS[kind]} '{name}': {plugin} is installed but failed "
                           f"to load: {self.broken[plugin]}")
            elif kind == "amalgamators":
                message += f" To add it, install its plugin: kamal install {name}"
            raise RegistryError(message) from None

    def get(self, kind: str, name: str) -> Any:
        """The loaded object registered as ``name``."""
        return self.entry(kind, name).load()
