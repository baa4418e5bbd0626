"""Hub teachers in real runs, `kamal pull`, `kamal push`, provenance and offline reuse.

Everything runs the real CLI in subprocesses against the loopback Hub (tests/hub_server.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import EXAMPLES, run_kamal

TEACHERS = EXAMPLES / "digits" / "teachers"


def _repo_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _hub_config(tmp_path: Path, revision: str | None = "main") -> Path:
    data = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    data["teachers"] = [
        {"name": "digits-0-4", "hub": "kamal-test/digits-0-4", "revision": revision},
        {"name": "digits-5-9", "hub": "kamal-test/digits-5-9"},
    ]
    data["train"]["epochs"] = 1
    path = tmp_path / "hub-kd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_hub_teachers_provenance_push_and_offline(hub_server, tmp_path):
    env = hub_server.hub_env(tmp_path)
    writer = {**env, "HF_TOKEN": hub_server.token}
    # publish both teachers with kamal push (a model repo folder works as well as a run)
    for name in ("digits-0-4", "digits-5-9"):
        published = run_kamal("push", str(TEACHERS / name), f"kamal-test/{name}", env=writer)
        assert published.returncode == 0, published.stderr
    assert hub_server.files("kamal-test/digits-5-9")["model.safetensors"] == (
        TEACHERS / "digits-5-9" / "model.safetensors").read_bytes()
    first = json.loads(run_kamal("pull", "kamal-test/digits-0-4", "--json", env=env).stdout)[
        "revision"]

    # pull: verified summary with the resolved revision
    pulled = run_kamal("pull", "kamal-test/digits-0-4@main", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    summary = json.loads(pulled.stdout)
    assert summary["revision"] == first and summary["architecture"] == "small-cnn"
    assert summary["tasks"][0]["classes"] == ["0", "1", "2", "3", "4"]
    assert summary["parameters"] == 23733
    text = run_kamal("pull", "kamal-test/digits-0-4", env=env).stdout
    assert f"kamal-test/digits-0-4 @ {first}" in text and "5 classes" in text

    # amalgamate with hub teachers: revision sha and weights sha256 recorded
    config = _hub_config(tmp_path)
    out = tmp_path / "run"
    result = run_kamal("amalgamate", str(config), "-o", str(out), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    source = report["teachers"][0]["source"]
    assert source["hub"] == "kamal-test/digits-0-4" and source["revision"] == first
    assert source["requested_revision"] == "main" and len(source["sha256"]) == 64
    card = (out / "student" / "README.md").read_text()
    assert first in card and source["sha256"] in card
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["teachers"][0]["revision"] == first

    # the repo moves on; re-running the recorded config still gets the old teacher
    moved = hub_server.add_commit("kamal-test/digits-0-4", _repo_files(TEACHERS / "digits-5-9-cnn"))
    assert moved != first
    again = run_kamal("amalgamate", str(out / "config.yaml"), "-o", str(tmp_path / "again"),
                      "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "again" / "report.json").read_text())
    assert rerun["teachers"][0]["source"]["sha256"] == source["sha256"]
    assert rerun["teachers"][0]["source"]["revision"] == first

    # push the student as a private repo, then pull it back with the token
    pushed = run_kamal("push", str(out), "someone/digits-student", "--private", env=writer)
    assert pushed.returncode == 0, pushed.stderr
    files = hub_server.files("someone/digits-student")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert files["model.safetensors"] == (out / "student" / "model.safetensors").read_bytes()
    published = files["README.md"].decode()
    assert published.startswith("---\nlibrary_name: kamal")
    assert "load_from_hub('someone/digits-student')" in published and first in published
    assert "student (kd)" in published  # the metrics table from report.json
    assert run_kamal("pull", "someone/digits-student", env=env).returncode != 0  # no token
    with_token = run_kamal("pull", "someone/digits-student", "--json", env=writer)
    assert with_token.returncode == 0, with_token.stderr
    local = json.loads(with_token.stdout)["local_dir"]
    evaluated = run_kamal("evaluate", local, "--data", "digits:test", "--option", "size=16",
                          "--json", env=writer)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["model"]["metrics"]["digits"]
    assert metrics["top1"] == report["student"]["metrics"]["digits"]["top1"]

    # offline from the cache: the pinned run works without a single request
    start = len(hub_server.request_log)
    offline = run_kamal("amalgamate", str(out / "config.yaml"), "-o", str(tmp_path / "offline"),
                        "--quiet", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert hub_server.requests_since(start) == []


def test_hub_errors_are_clear(hub_server, tmp_path):
    env = hub_server.hub_env(tmp_path)
    result = run_kamal("pull", "kamal-test/missing", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "kamal-test/missing" in result.stderr
    result = run_kamal("pull", "not a repo", env=env)
    assert result.returncode == 1 and "org/name" in result.stderr
    hub_server.add_commit("kamal-test/broken", {"config.json": b"{}", "model.safetensors": b"xx"})
    result = run_kamal("pull", "kamal-test/broken", env=env)
    assert result.returncode == 1 and "safetensors" in result.stderr
