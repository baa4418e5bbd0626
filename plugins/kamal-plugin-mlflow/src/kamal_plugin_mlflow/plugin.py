"""The hook module kamal loads (entry point group ``kamal``): no mlflow import here, so
``kamal list-plugins`` stays fast."""

from __future__ import annotations

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = ">=1,<2"


@hookimpl
def register_loggers(register: Register) -> None:
    """The ``mlflow`` logger."""
    register("mlflow", "kamal_plugin_mlflow.logger:MLflowLogger")
