"""Plugin API versions, the core's distribution name, broken plugins named where used, and
``--debug`` showing a plugin's own import error."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

from conftest import ROOT, run_kamal

import kamal
from kamal.plugins import api_mismatch
from kamal.scaffold import core_requirement, new_plugin


def test_a_plugin_built_for_another_api_is_listed_incompatible_and_not_loaded(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-clash,kamal-plugin-broken"}
    result = run_kamal("list-plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    infos = {i["name"]: i for i in json.loads(result.stdout)}
    future = infos["kamal-plugin-future"]
    assert future["status"] == "incompatible" and future["provides"] == {}
    assert "built for kamal plugin API >=2,<3" in future["error"]
    assert f"provides API {kamal.PLUGIN_API}" in future["error"]
    assert "Core versions that fit: none released yet" in future["error"]
    assert infos["kamal-plugin-dummy"]["status"] == "ok" and infos["kamal"]["status"] == "ok"
    text = run_kamal("list-plugins", env=env).stdout
    assert "kamal-plugin-future (kamal-plugin-future 0.0.1) [INCOMPATIBLE: built for" in text


def test_api_ranges():
    assert api_mismatch(None) is None  # plugins from before API versions load
    assert api_mismatch(">=1,<2") is None
    assert "not a version range" in api_mismatch("one")
    assert api_mismatch(">=0.5,<1.5") is None
    assert "provides API 1.0; not loaded" in api_mismatch("<1")


def test_using_a_name_of_an_installed_but_broken_plugin_says_so(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-clash,kamal-plugin-broken"}
    result = run_kamal("amalgamate", "examples/digits/kd.yaml", "-o", str(tmp_path / "run"),
                       "--set", "algorithm.name=future", env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "kamal-plugin-future is installed but failed to load: built for kamal plugin API" in result.stderr
    assert "kamal install" not in result.stderr
    unknown = run_kamal("amalgamate", "examples/digits/kd.yaml", "-o", str(tmp_path / "run"),
                        "--set", "algorithm.name=nonesuch", env=env, cwd=ROOT)
    assert "To add it, install its plugin: kamal install nonesuch" in unknown.stderr


def test_debug_shows_the_plugins_own_import_error(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-clash,kamal-plugin-broken"}
    args = ["amalgamate", str(ROOT / "examples/digits/kd.yaml"), "-o", str(tmp_path / "run"),
            "--set", "algorithm.name=lazybroken"]
    plain = run_kamal(*args, env=env)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert "kamal_lazybroken_missing_dependency" in plain.stderr  # the message names it
    debug = run_kamal("--debug", *args, env=env)
    assert "Traceback" in debug.stderr
    # the plugin's own frame and error, not only the core's re-raise
    assert "kamal_plugin_lazybroken/algorithm.py" in debug.stderr
    assert "ModuleNotFoundError: No module named 'kamal_lazybroken_missing_dependency'" in debug.stderr


def test_no_bundled_plugin_or_scaffold_depends_on_the_bare_name_kamal(tmp_path):
    projects = sorted(ROOT.glob("plugins/*/pyproject.toml"))
    projects.append(new_plugin("name-check", tmp_path) / "pyproject.toml")
    assert len(projects) >= 5
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert core == kamal.CORE_DISTRIBUTION == "kamal-core"
    for path in projects:
        requires = tomllib.loads(path.read_text())["project"]["dependencies"]
        names = [r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in requires]
        assert "kamal" not in names, f"{path} requires the unrelated package 'kamal'"
        core_req = next(r for r in requires if r.startswith(core))
        assert "<" in core_req and ">=" in core_req, f"{path}: {core_req} has no version range"


def test_core_requirement_ranges():
    assert core_requirement("0.1.0") == "kamal-core>=0.1,<0.2"
    assert core_requirement("1.4.2") == "kamal-core>=1.4,<2"


def test_the_scaffolds_next_lines_work_as_printed(tmp_path):
    result = run_kamal("new-plugin", "next-check", "--dir", "sub", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()[2:]]
    assert lines == ["pip install -e './sub/kamal-plugin-next-check[test]'", "kamal list-plugins",
                     "pytest ./sub/kamal-plugin-next-check/tests"]
    project = tmp_path / "sub" / "kamal-plugin-next-check"
    extras = tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"pytest", "build"} <= {r.split(">")[0] for r in extras["test"]}
    # pip reads the argument as the local project (a bare name would go to the index)
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
                          "--no-build-isolation", "--report", "-", "--quiet", "-e",
                          "./sub/kamal-plugin-next-check[test]"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    (item,) = json.loads(dry.stdout)["install"]
    assert item["metadata"]["name"] == "kamal-plugin-next-check"
    assert item["download_info"]["url"] == project.as_uri()
