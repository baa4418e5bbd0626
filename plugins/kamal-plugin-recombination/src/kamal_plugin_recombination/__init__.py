"""kamal-plugin-recombination: combine same-architecture teachers, then prune to a budget.

``recombination`` (the amalgamator) builds a ``recombined`` network (the architecture) from
the teachers, exact to float tolerance, and prunes it channel by channel in rounds while
distilling from the teachers. Nothing here is imported until a run asks for it.
"""

from importlib import metadata

try:
    __version__ = metadata.version("kamal-plugin-recombination")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
