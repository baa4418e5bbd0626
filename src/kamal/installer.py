"""``kamal install`` / ``kamal uninstall``: pip, run in the environment kamal runs in, with
short plugin names expanded (``sbm`` -> ``kamal-plugin-sbm``) and pip's own options passed
through. After installing, what the new or updated plugins provide is printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from .version import CORE_DISTRIBUTION

PLUGIN_PREFIX = "kamal-plugin-"
# pip options that take a value as the next argument (it must not be expanded as a name)
_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-t", "--target",
    "--platform", "--python-version", "--implementation", "--abi", "--root", "--prefix",
    "--src", "--upgrade-strategy", "-i", "--index-url", "--extra-index-url", "-f",
    "--find-links", "--no-binary", "--only-binary", "--progress-bar", "--log", "--proxy",
    "--retries", "--timeout", "--exists-action", "--trusted-host", "--cert",
    "--client-cert", "--cache-dir", "--config-settings", "-C", "--report", "--python",
}
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(.*)$")


def expand(args: list[str]) -> list[str]:
    """``args`` with bare plugin names made distribution names; options, their values,
    paths, URLs and names that already are distributions are left as they are."""
    out: list[str] = []
    takes_value = False
    for arg in args:
        if takes_value or arg.startswith("-"):
            out.append(arg)
            takes_value = arg in _VALUE_OPTIONS  # "--find-links=dist" carries its own value
            continue
        match = _NAME.match(arg)
        if (match is None or "/" in arg or "\\" in arg or ":" in arg or Path(arg).exists()
                or match.group(1).startswith(("kamal-", "kamal_")) or match.group(1) == "kamal"):
            out.append(arg)
            continue
        out.append(PLUGIN_PREFIX + arg)
    return out


def installed_plugins() -> dict[str, dict]:
    """``{distribution: list-plugins entry}`` as a fresh process sees them (new entry points
    become visible only to a new interpreter)."""
    result = subprocess.run([sys.executable, "-m", "kamal", "list-plugins", "--json"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    return {entry["distribution"]: entry for entry in json.loads(result.stdout)}


def pip(command: str, args: list[str]) -> int:
    """Run ``python -m pip COMMAND ARGS`` in kamal's own environment; pip's exit code."""
    return subprocess.run([sys.executable, "-m", "pip", command, *args]).returncode


def describe_changes(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """Lines naming each plugin that is new or changed, and what it provides."""
    lines = []
    for dist, entry in sorted(after.items()):
        old = before.get(dist)
        if dist == CORE_DISTRIBUTION and old is not None and old["version"] == entry["version"]:
            continue
        if old is not None and old["version"] == entry["version"] and old["status"] == entry["status"]:
            continue
        provides = "; ".join(f"{kind}: {', '.join(names)}"
                             for kind, names in sorted(entry["provides"].items())) or "nothing"
        status = "" if entry["status"] == "ok" else f" [{entry['status'].upper()}: {entry['error']}]"
        lines.append(f"{dist} {entry['version']} provides {provides}{status}")
    return lines
