"""kamal-plugin-agglomerate: agglomerative feature distillation.

Several teachers' features (their pooled summary vector and/or their feature map) are
distilled into one student backbone through one adaptor head per teacher, as in AM-RADIO
(Ranzinger et al., CVPR 2024), Theia (Shang et al., 2024) and UNIC (Sariyildiz et al.,
ECCV 2024); teachers are balanced with PHI-S (Ranzinger et al., 2024). Select it with
``algorithm: {name: agglomerate}``; the modules here import only kamal's public API.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("kamal-plugin-agglomerate")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
