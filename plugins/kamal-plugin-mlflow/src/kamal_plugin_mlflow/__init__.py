"""kamal-plugin-mlflow: an experiment tracker for kamal runs, through the ``register_loggers``
hook. Select it with ``train.loggers: [mlflow]``; the modules here import only kamal's
public API."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("kamal-plugin-mlflow")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
