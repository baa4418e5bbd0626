"""Hook implementations: registers the ``cfl`` amalgamator lazily (no torch import here)."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """Common Feature Learning (Luo et al., IJCAI 2019)."""
    register("cfl", "kamal_plugin_cfl.algorithm:CFLAmalgamator")
