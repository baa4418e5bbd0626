"""Shared fixtures: the loopback Hub, installed fixture plugins, tiny teachers, the README's
digits job (trained once per test run), helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["hub_server"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests run in parallel (pytest -n N): one thread per process, subprocesses included,
    # so that N workers on N cores do not fight over them
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PLUGINS = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture plugins (dummy, broken, clash) pip-installed as real distributions.

    Installed into a target folder (no dependencies, no build isolation) so that a
    subprocess with that folder on PYTHONPATH discovers them through entry points.
    Installed once per test run.
    """

    def install(target: Path) -> None:
        dists = [str(p) for p in sorted(FIXTURE_PLUGINS.iterdir()) if (p / "pyproject.toml").exists()]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(target), *dists], check=True)

    return once_per_test_run(tmp_path_factory, "plugin-site", install)


def run_kamal(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (``python -m kamal``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kamal", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny same-architecture digits teachers (0-4, 5-9) at 8x8, as model repos, trained
    once per test run."""
    from kamal.testing import make_tiny_teachers

    folder = once_per_test_run(tmp_path_factory, "tiny-teachers", make_tiny_teachers)
    return make_tiny_teachers(folder)  # finds them trained


def once_per_test_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                      make: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``make(folder)`` fills once per test run: once in all under
    pytest-xdist too (its workers share it; the first one makes it, the others wait)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # base is .../pytest-N/popen-gwK: share pytest-N
        base = base.parent
    folder = base / name
    with FileLock(f"{folder}.lock"):
        if not (base / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            (base / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def readme_kd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's job, ``kamal amalgamate examples/digits/kd.yaml``, in one process with one
    thread: the run folder and the CLI's stdout. Trained once per test run and shared by the
    tests that check it and compare against it."""

    def make(folder: Path) -> None:
        result = run_kamal("amalgamate", str(EXAMPLES / "digits" / "kd.yaml"), "-o",
                           str(folder / "run"), "--quiet", cwd=folder, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        (folder / "stdout.txt").write_text(result.stdout)

    folder = once_per_test_run(tmp_path_factory, "readme-kd", make)
    return folder / "run", (folder / "stdout.txt").read_text()
