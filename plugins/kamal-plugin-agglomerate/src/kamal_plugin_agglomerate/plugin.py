"""Hook implementations: the ``agglomerate`` algorithm and the ``agglomerated`` student
architecture (what its saved student repos are rebuilt with), registered lazily."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """Agglomerative feature distillation (AM-RADIO, Theia, UNIC)."""
    register("agglomerate", "kamal_plugin_agglomerate.algorithm:AgglomerateAmalgamator")


@hookimpl
def register_architectures(register: Register) -> None:
    """The agglomerated student: a backbone, one adaptor per teacher, the teachers' heads."""
    register("agglomerated", "kamal_plugin_agglomerate.network:AGGLOMERATED")
