"""Who the core is, for pip and for plugins (no torch here: ``kamal --help`` reads it).

The import package and the command are ``kamal``; the distribution on the package index is
``kamal-core`` (the bare name ``kamal`` belongs to an unrelated project there). Plugins
depend on ``kamal-core`` with a version range, and state the range of the plugin API they
were built for (``KAMAL_PLUGIN_API`` in their hook module, e.g. ``">=1,<2"``).
"""

from __future__ import annotations

from importlib import metadata

CORE_DISTRIBUTION = "kamal-core"

# The plugin API: hooks, the Amalgamator contract and the names in ``kamal.__all__``. The
# major number changes when a plugin built for the previous one could break.
PLUGIN_API = "1.0"
# plugin API version -> the core releases that provide it (shown to users of a plugin built
# for another API)
PLUGIN_API_RELEASES = {"1.0": "kamal-core>=0.1"}


def core_version() -> str:
    """The installed core's version (``0+unknown`` when running from a source tree)."""
    try:
        return metadata.version(CORE_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
