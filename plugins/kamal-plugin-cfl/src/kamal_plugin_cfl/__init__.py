"""kamal-plugin-cfl: Common Feature Learning for knowledge amalgamation.

Luo, Wang, Fang, Hu, Tao and Song, "Knowledge Amalgamation from Heterogeneous Networks by
Common Feature Learning", IJCAI 2019 (arXiv:1906.10546). Select it in a run config with
``algorithm: {name: cfl}``; the modules here import only kamal's public API.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("kamal-plugin-cfl")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
