"""A user's install, by name: wheels of the core and a plugin in a folder, a fresh virtual
environment, ``pip install --find-links DIR kamal-plugin-sbm`` (no path), then
``kamal list-plugins``, a one-epoch sbm run, and ``kamal install`` / ``kamal uninstall``.

The fresh environment gets the core's third-party dependencies (torch and the rest) as
links to this environment's copies, through a ``.pth`` file, so pip finds them installed
and the test costs seconds, not a torch install; kamal-core and the plugins themselves come
only from the wheels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, FIXTURE_PLUGINS, ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install-by-name")]  # one env
OURS = {"kamal-core", "kamal-plugin-sbm", "kamal-plugin-dummy"}


def _dependency_closure(root: str) -> list[metadata.Distribution]:
    """Installed distributions ``root`` needs, transitively, without ``root`` itself."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        dist = metadata.distribution(todo.pop())
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name not in seen and name not in OURS:
                seen[name] = metadata.distribution(name)
                todo.append(name)
    return list(seen.values())


def _link_site(folder: Path) -> Path:
    """A folder of links to every top-level file of the core's dependencies (and pip)."""
    folder.mkdir()
    for dist in [*_dependency_closure("kamal-core"), metadata.distribution("pip")]:
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or (folder / top).exists():
                continue
            (folder / top).symlink_to(Path(dist.locate_file(top)).resolve())
    return folder


def _wheels(folder: Path) -> Path:
    sources = [ROOT, ROOT / "plugins" / "kamal-plugin-sbm", FIXTURE_PLUGINS / "kamal-plugin-dummy"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(folder), *map(str, sources)], check=True)
    return folder


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("by-name")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "kamal-deps.pth").write_text(str(_link_site(tmp / "deps")) + "\n")
    dist = _wheels(tmp / "dist")
    # by name, from the wheels' folder: what a user types
    installed = _run(python, "-m", "pip", "install", "--find-links", str(dist), "kamal-plugin-sbm")
    return python, dist, tmp, installed


def _run(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


def test_kamal_plugin_sbm_installs_by_name_lists_and_runs(fresh_env):
    python, dist, tmp, installed = fresh_env
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "kamal-2." not in installed.stdout  # never the unrelated project of that name
    listed = _run(python, "-m", "kamal", "list-plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    infos = {i["distribution"]: i for i in json.loads(listed.stdout)}
    assert infos["kamal-plugin-sbm"]["status"] == "ok"
    assert infos["kamal-plugin-sbm"]["provides"]["amalgamators"] == ["sbm"]
    assert set(infos) == {"kamal-core", "kamal-plugin-sbm"}
    where = _run(python, "-c", "import kamal, kamal_plugin_sbm; print(kamal.__file__); "
                               "print(kamal_plugin_sbm.__file__)").stdout
    assert str(ROOT / "src") not in where and "site-packages" in where  # from the wheels

    config = yaml.safe_load((EXAMPLES / "scenes" / "sbm.yaml").read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str(EXAMPLES / "scenes" / teacher["path"])
    config["train"]["epochs"] = 1
    (tmp / "sbm.yaml").write_text(yaml.safe_dump(config))
    run = _run(python, "-m", "kamal", "amalgamate", str(tmp / "sbm.yaml"), "--output",
               str(tmp / "run"), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp / "run" / "report.json").read_text())
    assert report["algorithm"] == "sbm" and "miou" in report["student"]["metrics"]["scenes-segmentation"]


def test_kamal_install_expands_short_names_and_prints_what_plugins_provide(fresh_env):
    python, dist, _, installed = fresh_env
    assert installed.returncode == 0, installed.stdout + installed.stderr
    added = _run(python, "-m", "kamal", "install", "dummy", "--find-links", str(dist))
    assert added.returncode == 0, added.stderr
    assert "kamal-plugin-dummy 0.0.1 provides amalgamators: dummy; architectures: dummy-cnn" in added.stdout
    removed = _run(python, "-m", "kamal", "uninstall", "dummy", "-y")
    assert removed.returncode == 0, removed.stderr
    listed = json.loads(_run(python, "-m", "kamal", "list-plugins", "--json").stdout)
    assert "kamal-plugin-dummy" not in {i["distribution"] for i in listed}
    failed = _run(python, "-m", "kamal", "install", "surely-not-a-plugin-xyz", "--no-index",
                  "--find-links", str(dist))
    assert failed.returncode != 0 and "pip install failed" in failed.stderr
