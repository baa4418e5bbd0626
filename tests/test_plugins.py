"""Plugin discovery: built-ins, real installed distributions, broken plugins, name clashes."""

from __future__ import annotations

import json
import types

import pytest
import yaml
from conftest import EXAMPLES, ROOT, run_kamal

from kamal import RegistryError, hookimpl, load_model
from kamal.plugins import get_registry, plugin_infos, register_plugin, unregister_plugin


def test_builtins_are_registered_through_the_hooks():
    registry = get_registry()
    assert "kd" in registry.names("amalgamators")
    assert {"small-cnn", "small-vgg", "resnet18"} <= set(registry.names("architectures"))
    assert {"digits", "image-folder", "torchvision"} <= set(registry.names("datasets"))
    core = next(i for i in plugin_infos() if i.name == "kamal")
    assert core.status == "ok" and "register_amalgamators" in core.hooks


def test_installed_plugin_is_discovered_and_usable(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-clash"}
    result = run_kamal("list-plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    infos = {i["name"]: i for i in json.loads(result.stdout)}
    dummy = infos["kamal-plugin-dummy"]
    assert dummy["status"] == "ok"
    assert dummy["distribution"] == "kamal-plugin-dummy" and dummy["version"] == "0.0.1"
    assert dummy["provides"] == {"amalgamators": ["dummy"], "architectures": ["dummy-cnn"]}

    # usable: the plugin's amalgamator trains the plugin's architecture through the CLI
    config = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str(EXAMPLES / "digits" / teacher["path"])
    config["algorithm"] = {"name": "dummy", "temperature": 3.0}
    config["student"]["architecture"] = "dummy-cnn"
    config["student"]["architecture_kwargs"] = {"width": 8}
    config["train"]["epochs"] = 1
    path = tmp_path / "dummy.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = run_kamal("amalgamate", str(path), "-o", str(out), "--quiet",
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] == "dummy" and report["hyperparameters"]["temperature"] == 3.0
    student = json.loads((out / "student" / "config.json").read_text())
    assert student["architecture"] == "dummy-cnn"
    assert 0.0 <= report["student"]["metrics"]["digits"]["top1"] <= 1.0
    model = load_model(out / "student")  # the plugin's architecture rebuilds it from the repo
    assert sum(p.numel() for p in model.parameters()) == report["student"]["params"]


def test_broken_plugin_is_listed_with_its_error_and_the_rest_works(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-clash"}
    result = run_kamal("list-plugins", "--json", env=env)
    assert result.returncode == 0
    infos = {i["name"]: i for i in json.loads(result.stdout)}
    broken = infos["kamal-plugin-broken"]
    assert broken["status"] == "error"
    assert "kamal_dependency_that_does_not_exist" in broken["error"]
    assert infos["kamal"]["status"] == "ok" and infos["kamal-plugin-dummy"]["status"] == "ok"
    text = run_kamal("list-plugins", env=env)
    assert "kamal-plugin-broken" in text.stdout and "ERROR" in text.stdout


def test_strict_mode_turns_a_broken_plugin_into_an_error(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_STRICT_PLUGINS": "1"}
    result = run_kamal("list-plugins", env=env)
    assert result.returncode != 0
    assert "kamal-plugin-broken" in result.stderr


def test_a_plugin_reusing_a_core_name_is_the_broken_one(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_DISABLE_PLUGINS": "kamal-plugin-broken"}
    result = run_kamal("list-plugins", "--json", env=env)
    infos = {i["name"]: i for i in json.loads(result.stdout)}
    assert infos["kamal"]["status"] == "ok" and infos["kamal"]["error"] is None
    clash = infos["kamal-plugin-clash"]
    assert clash["status"] == "error"
    assert "registers algorithm 'kd', a name the kamal core reserves" in clash["error"]
    assert "kd" not in clash["provides"].get("amalgamators", [])
    # the core's kd is still the one used: the run reaches kd's own config validation
    result = run_kamal("amalgamate", "examples/digits/kd.yaml", "-o", "unused", "--set",
                       "algorithm.temperature=-1", env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "algorithm.temperature" in result.stderr and "registered by several" not in result.stderr


def test_load_plugins_switch_limits_discovery(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "KAMAL_LOAD_PLUGINS": "kamal-plugin-dummy"}
    names = [i["name"] for i in json.loads(run_kamal("list-plugins", "--json", env=env).stdout)]
    assert names == ["kamal", "kamal-plugin-dummy"]
    env["KAMAL_LOAD_PLUGINS"] = ""
    names = [i["name"] for i in json.loads(run_kamal("list-plugins", "--json", env=env).stdout)]
    assert names == ["kamal"]


def test_in_process_plugin_registration_and_clash():
    first = types.SimpleNamespace(
        register_datasets=hookimpl(lambda register: register("shared-name", "x:y")))
    second = types.SimpleNamespace(
        register_datasets=hookimpl(lambda register: register("shared-name", "x:z")))
    register_plugin(first, "first-test-plugin")
    register_plugin(second, "second-test-plugin")
    try:  # two plugins: the name is unusable, and the error names both
        with pytest.raises(RegistryError, match="first-test-plugin.*second-test-plugin"):
            get_registry().get("datasets", "shared-name")
    finally:
        unregister_plugin("first-test-plugin")
        unregister_plugin("second-test-plugin")
    reuser = types.SimpleNamespace(
        register_datasets=hookimpl(lambda register: register("digits", "x:y")))
    register_plugin(reuser, "reusing-test-plugin")
    try:  # a core name: the core's stays, the plugin is marked broken
        assert get_registry().get("datasets", "digits").__name__ == "build_digits"
        info = next(i for i in plugin_infos() if i.name == "reusing-test-plugin")
        assert "a name the kamal core reserves" in (info.error or "")
    finally:
        unregister_plugin("reusing-test-plugin")


def test_list_plugins_and_help_do_not_import_torch_or_trackers():
    for args in (["--help"], ["list-plugins"]):
        code = (f"import sys, runpy; sys.argv = ['kamal', *{args!r}]\n"
                "try:\n    runpy.run_module('kamal', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "assert 'torch' not in sys.modules, 'torch was imported'\n"
                "heavy = [m for m in ('tensorboard', 'mlflow') if m in sys.modules]\n"
                "assert not heavy, f'{heavy} imported'\n"
                "print('NO_TORCH')")
        import subprocess
        import sys

        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "NO_TORCH" in result.stdout, result.stderr
