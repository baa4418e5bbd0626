"""kamal-plugin-sbm: Student Becoming the Master, knowledge amalgamation for dense tasks.

Ye, Ji, Wang, Ou, Tao and Song, "Student Becoming the Master: Knowledge Amalgamation for
Joint Scene Parsing, Depth Estimation, and More", CVPR 2019 (arXiv:1904.10167). Select it
in a run config with ``algorithm: {name: sbm}`` and ``student.architecture: sbm-segnet``;
the modules here import only kamal's public API.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("kamal-plugin-sbm")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
