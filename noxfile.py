"""Developer sessions: ``nox -s lint tests`` is what CI runs (see .ci/run and README)."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
# torch is pinned in pyproject.toml; install it first so pip takes the local wheels
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
PLUGINS = sorted(str(p) for p in (ROOT / "plugins").glob("kamal-plugin-*")
                 if (p / "pyproject.toml").exists())
TEST_PLUGIN = str(ROOT / "tests" / "fixtures" / "kamal-plugin-dummy")


def _install_everything(session: nox.Session) -> None:
    session.install(*TORCH)
    # real (non-editable) distributions: the core, every bundled plugin, the test plugin
    session.install(".[dev]", *PLUGINS, TEST_PLUGIN, "setuptools>=69")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Install the core and all plugins as real distributions, then run pytest."""
    _install_everything(session)
    session.run("kamal", "list-plugins")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over the core, the plugins and the tests."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "plugins", "noxfile.py", "benchmarks")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmark scripts (they print figures; nothing is asserted)."""
    _install_everything(session)
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        session.run("python", str(script))
