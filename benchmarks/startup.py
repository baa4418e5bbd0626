"""Median wall time of `kamal --help` and `kamal list-plugins` beside `python -c pass`.

    python benchmarks/startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "kamal --help": [sys.executable, "-m", "kamal", "--help"],
    "kamal list-plugins": [sys.executable, "-m", "kamal", "list-plugins"],
}


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
    print(f"{'command':<22} {'median s':>9} {'vs python':>10}")
    for name, command in COMMANDS.items():
        seconds = median_seconds(command, args.repeats)
        base = base or seconds
        print(f"{name:<22} {seconds:>9.3f} {seconds / base:>9.1f}x")


if __name__ == "__main__":
    main()
