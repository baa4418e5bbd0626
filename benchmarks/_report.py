"""Shared by the benchmark scripts: each writes only its own key of docs/benchmarks.json,
stamped with the command, the date and the machine, then re-renders every marked region
(``<!-- name:begin -->`` ... ``<!-- name:end -->``) of the Markdown files from the JSON
(benchmarks/_regions.py). Text outside the markers is kept as written.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ROOT / "docs" / "benchmarks.md"
JSON_FILE = ROOT / "docs" / "benchmarks.json"
HEADER = ("# Benchmarks\n\nWritten by the scripts in `benchmarks/` (`nox -s bench` runs them "
          "all). Each section names the command that produced it, the date and the machine; "
          "rerunning a script rewrites only its own section.\n")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(terse=True), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(load, 2) if load is not None else None}


def command() -> str:
    """The command line that ran the calling script."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = script.relative_to(ROOT)
    except ValueError:
        shown = script
    threads = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return " ".join([*threads, "python", str(shown), *sys.argv[1:]])


def stamp(info: dict[str, Any]) -> str:
    """One line: command, date, machine."""
    return (f"_Measured by `{info['command']}` on {info['date']}: {info['machine']['platform']}, "
            f"{info['machine']['cpus']} CPUs, torch {info['machine']['torch']} with "
            f"{info['machine']['torch_threads']} thread(s), 1-min load average "
            f"{info['machine']['load_average_1min']} at the end._")


def stored(section: str) -> dict[str, Any]:
    """``section``'s key of docs/benchmarks.json as last written."""
    return json.loads(JSON_FILE.read_text())[section]


def update_json(section: str, data: dict[str, Any], restamp: bool = True) -> None:
    """Replace ``section``'s key in docs/benchmarks.json, stamped with command, date, machine
    (without ``restamp``: keeping the stamp ``data`` holds, for a re-rendering that measured
    nothing)."""
    info = ({"command": command(), "date": _dt.date.today().isoformat(), "machine": machine()}
            if restamp else {})
    everything = json.loads(JSON_FILE.read_text()) if JSON_FILE.exists() else {}
    everything[section] = {**info, **data}
    JSON_FILE.write_text(json.dumps(everything, indent=1) + "\n")


def update(section: str, markdown: str, data: dict[str, Any]) -> None:
    """Store ``section``'s data and the Markdown its script built from it (kept in the JSON as
    ``markdown``: the region renders it with the stamp), then re-render every region; the
    section is appended to docs/benchmarks.md when it has no region there yet."""
    update_json(section, {**data, "markdown": markdown.rstrip()})
    text = MARKDOWN.read_text() if MARKDOWN.exists() else HEADER
    if f"<!-- {section}:begin -->" not in text:
        MARKDOWN.write_text(text.rstrip() + f"\n\n<!-- {section}:begin -->\n"
                            f"<!-- {section}:end -->\n")
    import _regions

    _regions.render_all()
