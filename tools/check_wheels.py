"""Checks the wheels in a folder (``nox -s build`` runs it): each has a licence and a
summary; every plugin requires ``kamal-core`` with a lower and an upper bound and never the
unrelated distribution ``kamal``. Exits non-zero, naming the wheel, on the first problem."""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement


def problems(wheel: Path) -> list[str]:
    """What is wrong with one wheel's metadata (empty: nothing)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(name).decode())
    found = []
    if not (meta.get("License-Expression") or meta.get("License")):
        found.append("no licence")
    if not meta.get("Summary"):
        found.append("no summary")
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    if any(r.name == "kamal" for r in requires):
        found.append("requires 'kamal', an unrelated project on the index; require kamal-core")
    if meta["Name"].startswith("kamal-plugin-"):
        core = [r for r in requires if r.name == "kamal-core"]
        if not core:
            found.append("does not require kamal-core")
        elif not ({s.operator for s in core[0].specifier} >= {">=", "<"}):
            found.append(f"kamal-core requirement '{core[0]}' needs a lower and an upper bound")
    return found


def main(folder: str) -> int:
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}")
        return 1
    bad = {w.name: p for w in wheels if (p := problems(w))}
    for name, found in bad.items():
        print(f"{name}: {'; '.join(found)}")
    print(f"{len(wheels) - len(bad)} of {len(wheels)} wheels pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
