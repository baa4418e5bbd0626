"""Regenerate the key tables in docs/configuration.md from the typed configs.

    python docs/generate.py        # rewrite the generated part in place
    python docs/generate.py --check  # exit 1 if it is out of date (used by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

from kamal.config import RunConfig, TrainRunConfig, reference_markdown
from kamal.plugins import get_registry
from kamal.version import CORE_DISTRIBUTION

DOC = Path(__file__).with_name("configuration.md")
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def generated() -> str:
    """The Markdown that belongs between the markers."""
    parts = [reference_markdown(RunConfig, "`kamal amalgamate` configs"),
             reference_markdown(TrainRunConfig, "`kamal train` configs")]
    registry = get_registry()
    for name, entry in sorted(registry.entries("amalgamators").items()):
        if entry.distribution != CORE_DISTRIBUTION:
            continue  # plugins document their own hyperparameters in docs/algorithms/
        parts.append(reference_markdown(entry.load().Config, f"`algorithm: {name}` (built in)"))
    return "\n".join(parts)


def main() -> int:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = f"{head}{START}\n{generated()}\n{END}{tail}"
    if "--check" in sys.argv:
        if updated != text:
            print("docs/configuration.md is out of date: run python docs/generate.py")
            return 1
        return 0
    DOC.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
