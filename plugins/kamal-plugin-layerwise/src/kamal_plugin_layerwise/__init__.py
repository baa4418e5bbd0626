"""kamal-plugin-layerwise: layer-wise knowledge amalgamation (Shen et al., AAAI 2019).

Registers the ``layerwise`` amalgamator. Importing this package imports no torch; the
algorithm lives in :mod:`kamal_plugin_layerwise.algorithm`.
"""

__all__: list[str] = []
