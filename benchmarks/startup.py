"""Median wall time of `kamal --help` and `kamal list-plugins` beside `python -c pass`,
with whatever plugins are installed (`nox -s bench`: every bundled one). Rewrites the
"startup" section of docs/benchmarks.md and its key in docs/benchmarks.json.

    python benchmarks/startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

# the console script installed beside this interpreter (what users type), else python -m kamal
_SCRIPT = Path(sys.executable).with_name("kamal")
KAMAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kamal"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "kamal --help": [*KAMAL, "--help"],
    "kamal list-plugins": [*KAMAL, "list-plugins"],
}
TARGET_S = 0.5  # kamal list-plugins, median


def install_kind() -> str:
    """Whether kamal is installed editable (slower start: its import hooks) or as a wheel."""
    from importlib.metadata import distribution

    direct = distribution("kamal-core").read_text("direct_url.json") or "{}"
    editable = json.loads(direct).get("dir_info", {}).get("editable", False)
    return "editable installs" if editable else "regular (non-editable) installs"


def median_seconds(command: list[str], repeats: int) -> float:
    """Median wall time of ``command`` over ``repeats`` runs (after one warm-up)."""
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    base = None
    medians = {}
    print(f"{'command':<22} {'median s':>9} {'vs python':>10}")
    for name, command in COMMANDS.items():
        seconds = median_seconds(command, args.repeats)
        base = base or seconds
        medians[name] = seconds
        print(f"{name:<22} {seconds:>9.3f} {seconds / base:>9.1f}x")
    plugins = subprocess.run([*KAMAL, "list-plugins", "--json"], capture_output=True, text=True)
    try:
        names = [p.get("name") for p in json.loads(plugins.stdout)]
    except (ValueError, AttributeError):
        names = []
    listed = medians["kamal list-plugins"]
    lines = ["## Startup", "",
             f"Median wall time of {args.repeats} runs each (after one warm-up), through "
             f"{'the `kamal` console script' if len(KAMAL) == 1 else '`python -m kamal`'}, "
             f"{install_kind()}, with these plugins loaded: "
             f"{', '.join(str(n) for n in names) or 'none'}.",
             "", "| command | median s | vs python |", "|---|---|---|"]
    lines += [f"| `{name}` | {s:.3f} | {s / base:.1f}x |" for name, s in medians.items()]
    lines += ["", f"- `kamal list-plugins` under {TARGET_S} s median: "
                  f"**{'met' if listed < TARGET_S else 'missed'}** ({listed:.3f} s)."]
    _report.update("startup", "\n".join(lines), {"median_s": medians, "plugins": names,
                                                 "repeats": args.repeats,
                                                 "install": install_kind()})


if __name__ == "__main__":
    main()
