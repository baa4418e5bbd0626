"""The Hub going down does not stop a run whose teachers are cached (issue 20, part 3).

Real CLI in subprocesses against the loopback Hub (tests/hub_server.py), which is stopped
after the teachers were pulled: a branch name then resolves to the commit the local cache
recorded for it, with one warning, and report.json / config.yaml say so. A repo that was
never cached still fails with the one-line "Could not reach the Hub" message, and an HTTP
refusal (404) while the Hub is up is never papered over with the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import EXAMPLES, run_kamal

TEACHERS = EXAMPLES / "digits" / "teachers"


def _repo_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_cached_branch_survives_an_outage(hub_server, tmp_path):
    env = hub_server.hub_env(tmp_path)
    shas = {name: hub_server.add_commit(f"kamal-test/{name}", _repo_files(TEACHERS / name))
            for name in ("digits-0-4", "digits-5-9")}
    hub_server.add_commit("kamal-test/never-pulled", _repo_files(TEACHERS / "digits-0-4"))
    for ref in ("kamal-test/digits-0-4@main", "kamal-test/digits-5-9"):
        online = run_kamal("pull", ref, "--json", env=env)
        assert online.returncode == 0, online.stderr
        assert json.loads(online.stdout)["revision_from"] == "hub"
        assert "warning" not in online.stderr

    # a refusal from a running Hub is an answer, not an outage: no cache fallback
    hub_server.repos["kamal-test/digits-0-4"].private = True
    refused = run_kamal("pull", "kamal-test/digits-0-4@main", env=env)
    assert refused.returncode == 1 and "not found" in refused.stderr
    assert "local cache" not in refused.stderr and "Traceback" not in refused.stderr
    hub_server.repos["kamal-test/digits-0-4"].private = False

    hub_server.close()  # the Hub goes down

    pulled = run_kamal("pull", "kamal-test/digits-0-4@main", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    summary = json.loads(pulled.stdout)
    assert summary["revision"] == shas["digits-0-4"] and summary["revision_from"] == "cache"
    assert summary["parameters"] == 23733
    warnings = [line for line in pulled.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and shas["digits-0-4"] in warnings[0]
    assert "unreachable" in warnings[0] and "kamal-test/digits-0-4@main" in warnings[0]
    text = run_kamal("pull", "kamal-test/digits-0-4@main", env=env).stdout
    assert "local cache" in text

    # a run with branch-named hub teachers goes on, and records where the revisions came from
    data = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    data["teachers"] = [
        {"name": "digits-0-4", "hub": "kamal-test/digits-0-4", "revision": "main"},
        {"name": "digits-5-9", "hub": "kamal-test/digits-5-9"},
    ]
    data["train"]["epochs"] = 1
    config = tmp_path / "hub-kd.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    run = run_kamal("amalgamate", str(config), "-o", str(out), "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, run.stderr  # once per teacher
    assert shas["digits-0-4"] in warnings[0] and shas["digits-5-9"] in warnings[1]
    report = json.loads((out / "report.json").read_text())
    for teacher, name in zip(report["teachers"], ("digits-0-4", "digits-5-9"), strict=True):
        assert teacher["source"]["revision"] == shas[name]
        assert teacher["source"]["revision_from"] == "cache"
    recorded_text = (out / "config.yaml").read_text()
    assert f"# teachers.0: revision {shas['digits-0-4']} came from the local Hub cache" in recorded_text
    assert "# teachers.1:" in recorded_text
    recorded = yaml.safe_load(recorded_text)
    assert [t["revision"] for t in recorded["teachers"]] == [shas["digits-0-4"], shas["digits-5-9"]]

    # the recorded teachers (pinned shas) evaluate without the Hub
    evaluated = run_kamal("evaluate", str(out), "--data", "digits:test", "--option", "size=16",
                          "--teachers", "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert len(json.loads(evaluated.stdout)["teachers"]) == 2
    assert "calibrating the teachers: " in evaluated.stderr  # progress on stderr, JSON on stdout

    # never cached: today's clear message, one line, no traceback
    missing = run_kamal("pull", "kamal-test/never-pulled@main", env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "Could not reach the Hub" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr
    data["teachers"][1] = {"name": "other", "hub": "kamal-test/never-pulled", "revision": "main"}
    config.write_text(yaml.safe_dump(data))
    failed = run_kamal("amalgamate", str(config), "-o", str(tmp_path / "failed"), "--quiet", env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "teachers.1.hub: Could not reach the Hub" in failed.stderr
