"""Developer sessions: ``nox -s lint tests`` is what CI runs (see .ci/run and README)."""

from __future__ import annotations

import json
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
STRICT = {"KAMAL_STRICT_PLUGINS": "1"}
# run in the session's Python (which has PyYAML): kd.yaml -> the same job with another algorithm
_SCAFFOLD_CONFIG = """
import sys
from pathlib import Path

import yaml

example, algorithm, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
config = yaml.safe_load(example.read_text())
for teacher in config["teachers"]:
    teacher["path"] = str((example.parent / teacher["path"]).resolve())
config["algorithm"]["name"] = algorithm  # the only change: kd's keys are the shared KD term's
config["train"]["epochs"] = 2
target.write_text(yaml.safe_dump(config, sort_keys=False))
"""


def _install_everything(session: nox.Session) -> None:
    session.install(*TORCH)
    # real (non-editable) distributions: the core, every bundled plugin, the test plugin
    session.install(".[dev]", *PLUGINS, TEST_PLUGIN, "setuptools>=69")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Install the core and all plugins as real distributions, then run pytest."""
    _install_everything(session)
    # strict: a plugin that fails to load (or a name clash) fails the session
    session.run("kamal", "list-plugins", env=STRICT)
    # two workers (one thread each, see tests/conftest.py); the torchrun tests stay in one
    session.run("pytest", *(session.posargs or ["-q", "-n", "2", "--dist", "loadgroup"]))
    _scaffolded_plugin_works(session)


def _scaffolded_plugin_works(session: nox.Session) -> None:
    """`kamal new-plugin` output installs, passes its own tests and runs through the CLI."""
    tmp = Path(session.create_tmp()) / "scaffold"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    session.run("kamal", "new-plugin", "scaffold-check", "--dir", str(tmp))
    plugin = tmp / "kamal-plugin-scaffold-check"
    session.install(str(plugin))
    session.run("pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests"))
    config, run = tmp / "run.yaml", tmp / "run"
    # the digits kd example with the scaffolded algorithm, built from the YAML itself
    session.run("python", "-c", _SCAFFOLD_CONFIG, str(ROOT / "examples" / "digits" / "kd.yaml"),
                "scaffold-check", str(config))
    session.run("kamal", "amalgamate", str(config), "--output", str(run), "--quiet", env=STRICT)
    report = json.loads((run / "report.json").read_text())
    if report["algorithm"] != "scaffold-check":
        session.error(f"the scaffolded run used {report['algorithm']!r}, not 'scaffold-check'")
    session.run("pip", "uninstall", "-y", "kamal-plugin-scaffold-check")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over the core, the plugins and the tests."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "plugins", "noxfile.py", "benchmarks", "tools")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmark scripts; each prints its figures and rewrites its section of
    docs/benchmarks.md and docs/benchmarks.json (nothing is asserted). Name scripts to run
    only those: ``nox -s bench -- startup.py``."""
    _install_everything(session)
    for script in session.posargs or ("startup.py", "speed.py", "quality.py"):
        session.run("python", str(ROOT / "benchmarks" / script))


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Build an sdist and a wheel of the core and of every bundled plugin into dist/, then
    check them: ``twine check`` (the long description renders) and kamal's own rules (a
    licence, and plugins require kamal-core with a version range, never the bare name)."""
    import shutil

    session.install("build>=1.2", "twine>=5")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for project in [str(ROOT), *PLUGINS]:
        session.run("python", "-m", "build", "--outdir", str(dist), project)
    session.run("twine", "check", "--strict", *sorted(str(p) for p in dist.iterdir()))
    session.run("python", str(ROOT / "tools" / "check_wheels.py"), str(dist))


@nox.session(python="3.11")
def quality(session: nox.Session) -> None:
    """Not in CI (minutes): every bundled algorithm on its example, seed 0, one thread (so
    the figures are reproducible); fails when one is below its floor (benchmarks/quality.py
    FLOORS). Writes the "quality" key of docs/benchmarks.json and re-renders the regions of
    the docs that quote it."""
    _install_everything(session)
    session.run("python", str(ROOT / "benchmarks" / "quality.py"), "--check", *session.posargs,
                env={"OMP_NUM_THREADS": "1"})
