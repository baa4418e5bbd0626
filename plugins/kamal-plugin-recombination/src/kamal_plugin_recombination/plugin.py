"""Hook implementations: registers the amalgamator and its architecture lazily (no torch)."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """Recombination: combine same-architecture teachers, prune to a parameter budget."""
    register("recombination", "kamal_plugin_recombination.algorithm:RecombinationAmalgamator")


@hookimpl
def register_architectures(register: Register) -> None:
    """The combined (and pruned) network, rebuilt from the widths in its config.json."""
    register("recombined", "kamal_plugin_recombination.network:RECOMBINED")
