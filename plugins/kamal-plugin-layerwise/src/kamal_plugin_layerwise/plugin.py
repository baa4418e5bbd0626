"""Hook implementations: registers ``layerwise`` lazily, so listing plugins imports no torch."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """Layer-wise amalgamation with auto-encoder blocks per tapped layer."""
    register("layerwise", "kamal_plugin_layerwise.algorithm:LayerwiseAmalgamator")
