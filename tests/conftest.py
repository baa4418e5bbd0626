"""Shared fixtures: the loopback Hub, installed fixture plugins, tiny teachers, the README's
digits job (trained once per test run), helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["hub_server"]

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PLUGINS = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture plugins (dummy, broken, clash) pip-installed as real distributions.

    Installed into a target folder (no dependencies, no build isolation) so that a
    subprocess with that folder on PYTHONPATH discovers them through entry points.
    """
    target = tmp_path_factory.mktemp("plugin-site")
    dists = [str(p) for p in sorted(FIXTURE_PLUGINS.iterdir()) if (p / "pyproject.toml").exists()]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), *dists], check=True)
    return target


def run_kamal(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (``python -m kamal``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kamal", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_teachers() -> list[Path]:
    """Two tiny same-architecture digits teachers (0-4, 5-9) at 8x8, as model repos."""
    from kamal.testing import make_tiny_teachers

    return make_tiny_teachers()


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder for this test run only, shared by pytest-xdist's workers (if any)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # base is .../pytest-N/popen-gwK: share pytest-N
        base = base.parent
    return base / name


@pytest.fixture(scope="session")
def readme_kd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's job, ``kamal amalgamate examples/digits/kd.yaml``, in one process with one
    thread: the run folder and the CLI's stdout. Trained once per test run (once in all, under
    pytest-xdist) and shared by the tests that check it and compare against it."""
    from filelock import FileLock

    folder = shared_dir(tmp_path_factory, "readme-kd")
    with FileLock(f"{folder}.lock"):
        if not (folder / "stdout.txt").exists():
            folder.mkdir(parents=True, exist_ok=True)
            result = run_kamal("amalgamate", str(EXAMPLES / "digits" / "kd.yaml"), "-o",
                               str(folder / "run"), "--quiet", cwd=folder,
                               env={"OMP_NUM_THREADS": "1"})
            assert result.returncode == 0, result.stderr
            (folder / "stdout.txt").write_text(result.stdout)
    return folder / "run", (folder / "stdout.txt").read_text()
