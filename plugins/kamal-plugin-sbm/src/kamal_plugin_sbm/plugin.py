"""Hook implementations: the ``sbm`` amalgamator and its ``sbm-segnet`` student, lazily."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """Student Becoming the Master (Ye et al., CVPR 2019)."""
    register("sbm", "kamal_plugin_sbm.algorithm:SBMAmalgamator")


@hookimpl
def register_architectures(register: Register) -> None:
    """The branched multi-task SegNet student that ``sbm`` trains (and that loads it later)."""
    register("sbm-segnet", "kamal_plugin_sbm.student:SBM_SEGNET")
