"""kamal.hub against a loopback Hub: the real huggingface_hub client, real HTTP, no mocks.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_TOKEN when it is imported,
and later changes are ignored. Patching its module constants in-process would test a setup no
user has, so each client run is a subprocess started with the environment a user would set
(``hub_server.hub_env``). Several operations share one subprocess to keep the file fast.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from kamal.hub import HubError, parse_repo_ref, upload_model_repo

if TYPE_CHECKING:
    from hub_server import HubServer

# The fixture lives in tests/hub_server.py; importing it here would bypass pytest's assertion
# rewriting of that module, so it is loaded as a plugin (a conftest may load it too).
pytest_plugins = ["hub_server"]

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

# Runs kamal.hub operations given as JSON in argv[1]; prints one JSON result per operation.
# A HubError becomes {"error": message}; any other exception fails the run (a bug).
_DRIVER = """
import json, pathlib, sys
from kamal import hub
results = []
for op in json.loads(sys.argv[1]):
    kind = op.pop("op")
    try:
        if kind == "download":
            repo = hub.download_model_repo(**op)
            results.append({"commit": repo.commit, "local_dir": str(repo.local_dir),
                            "from_cache": repo.from_cache})
        else:
            op["folder"] = pathlib.Path(op["folder"])
            results.append({"commit": hub.upload_model_repo(**op)})
    except hub.HubError as error:
        results.append({"error": str(error)})
print(json.dumps(results))
"""


def model_files(tag: str, readme: bool = True) -> dict[str, bytes]:
    """A model repo's files; ``tag`` makes every file's bytes differ between versions."""
    files = {
        "config.json": json.dumps({"architecture": "small-cnn", "tag": tag}).encode(),
        "model.safetensors": bytes(range(256)) * 64 + tag.encode(),  # opaque bytes to the hub
    }
    if readme:
        files["README.md"] = f"# test model {tag}\n".encode()
    return files


def client_env(hub: HubServer, tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """The user environment of a client run: this hub, a fresh HF_HOME, kamal importable."""
    env = hub.hub_env(tmp_path)
    env["PYTHONPATH"] = str(SRC) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_hub(env: dict[str, str], *ops: dict[str, Any]) -> list[dict[str, Any]]:
    """Run kamal.hub operations in a fresh interpreter with ``env``; one result per op."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(list(ops))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def download(repo_id: str, revision: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return {"op": "download", "repo_id": repo_id, "revision": revision, **kwargs}


def upload(folder: pathlib.Path, repo_id: str, **kwargs: Any) -> dict[str, Any]:
    return {"op": "upload", "folder": str(folder), "repo_id": repo_id, **kwargs}


def read_dir(result: dict[str, Any]) -> dict[str, bytes]:
    """The files a download result points at."""
    assert "error" not in result, result["error"]
    return {p.name: p.read_bytes() for p in pathlib.Path(result["local_dir"]).iterdir()}


def write_model(folder: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


# --- no hub needed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@main", ("org/name", "main")),
        ("Some_Org/model.v2-small@refs/pr/1", ("Some_Org/model.v2-small", "refs/pr/1")),
        ("a/b@" + "0" * 40, ("a/b", "0" * 40)),
    ],
)
def test_parse_repo_ref_splits_revision(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_repo_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "name",
        "org/",
        "/name",
        "a/b/c",
        "org/na me",
        "org/-name",
        "org/a--b",
        "org/a..b",
        "org/name.git",
        "org/name@",
        "",
    ],
)
def test_parse_repo_ref_rejects_bad_ids(ref: str) -> None:
    with pytest.raises(ValueError, match="org/name"):
        parse_repo_ref(ref)


def test_import_is_cheap() -> None:
    # kamal.hub itself must import neither torch nor huggingface_hub (both are slow; the latter
    # also freezes its env configuration at import).
    code = (
        "import sys; import kamal; before = set(sys.modules); import kamal.hub; "
        "new = set(sys.modules) - before; "
        "print(sorted(m for m in new if m.split('.')[0] in ('torch', 'huggingface_hub')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_upload_refuses_a_folder_without_weights(tmp_path: pathlib.Path) -> None:
    folder = write_model(tmp_path / "m", {"config.json": b"{}"})
    with pytest.raises(HubError, match="missing model.safetensors"):
        upload_model_repo(folder, "org/m")


# --- downloads --------------------------------------------------------------------------------


def test_download_branch_pins_commit_in_hf_cache(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    sha = hub_server.add_commit("org/teacher", model_files("v1"))
    env = client_env(hub_server, tmp_path)

    [result] = run_hub(env, download("org/teacher"))

    assert result["commit"] == sha
    cache = pathlib.Path(env["HF_HOME"]) / "hub" / "models--org--teacher"
    assert pathlib.Path(result["local_dir"]) == cache / "snapshots" / sha
    assert read_dir(result) == model_files("v1")
    assert (cache / "refs" / "main").read_text() == sha  # what lets an offline run resolve main
    # The branch is resolved once; every file is then fetched at the sha.
    resolve_paths = [p for _, p in hub_server.request_log if "/resolve/" in p]
    assert resolve_paths and all(f"/resolve/{sha}/" in p for p in resolve_paths)
    assert ("GET", "/api/models/org/teacher") in hub_server.request_log

    # Again, now cached: a branch costs one revision look-up, a pinned sha nothing at all.
    seen = len(hub_server.request_log)
    again, pinned = run_hub(env, download("org/teacher"), download("org/teacher", sha))
    assert again["commit"] == pinned["commit"] == sha
    assert hub_server.requests_since(seen) == [("GET", "/api/models/org/teacher")]


def test_pinned_sha_keeps_old_files_after_branch_moves_on(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    old = hub_server.add_commit("org/teacher", model_files("v1"))
    new = hub_server.add_commit("org/teacher", model_files("v2"))

    pinned, latest = run_hub(
        client_env(hub_server, tmp_path), download("org/teacher", old), download("org/teacher")
    )

    assert (pinned["commit"], latest["commit"]) == (old, new)
    assert read_dir(pinned) == model_files("v1")
    assert read_dir(latest) == model_files("v2")


def test_offline_resolves_from_cache_with_zero_requests(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    sha = hub_server.add_commit("org/teacher", model_files("v1"))
    bare = hub_server.add_commit("org/bare", model_files("b", readme=False))
    env = client_env(hub_server, tmp_path)
    run_hub(env, download("org/teacher", "main"), download("org/bare"))
    seen = len(hub_server.request_log)

    branch, pinned, no_card = run_hub(
        {**env, "HF_HUB_OFFLINE": "1"},
        download("org/teacher", "main"),
        download("org/teacher", sha),
        download("org/bare"),
    )

    assert hub_server.requests_since(seen) == []
    assert branch["commit"] == pinned["commit"] == sha
    assert read_dir(branch) == model_files("v1")
    assert no_card["commit"] == bare
    assert read_dir(no_card) == model_files("b", readme=False)


def test_offline_and_not_cached_says_how_to_fix(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    hub_server.add_commit("org/teacher", model_files("v1"))
    env = {**client_env(hub_server, tmp_path), "HF_HUB_OFFLINE": "1"}

    branch, tag = run_hub(env, download("org/teacher"), download("org/teacher", "v1"))

    assert hub_server.request_log == []
    assert "`kamal pull org/teacher`" in branch["error"]
    assert "HF_HUB_OFFLINE" in branch["error"]
    assert "`kamal pull org/teacher@v1`" in tag["error"]


def test_unreachable_hub_falls_back_to_the_cached_commit_not_to_an_unknown_one(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    # As huggingface_hub, transformers and timm do: with the Hub unreachable, a branch resolves
    # to the commit the cache recorded for it (flagged from_cache; kamal warns once). A branch
    # never resolved online is still the "Could not reach the Hub" error. A pinned sha needs
    # no Hub at all. The revision look-up fails fast on a refused connection (no backoff).
    sha = hub_server.add_commit("org/teacher", model_files("v1"))
    env = client_env(hub_server, tmp_path)
    (online,) = run_hub(env, download("org/teacher"))
    assert online["from_cache"] is False
    hub_server.close()

    branch, pinned, unknown = run_hub(env, download("org/teacher"), download("org/teacher", sha),
                                      download("org/teacher", "never-seen"))

    assert branch["commit"] == sha and branch["from_cache"] is True
    assert read_dir(branch) == model_files("v1")
    assert pinned["commit"] == sha and pinned["from_cache"] is False
    assert "Could not reach the Hub" in unknown["error"]
    assert "HF_HUB_OFFLINE=1" in unknown["error"]


def test_a_hub_that_hangs_times_out_to_the_cached_commit(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    # A Hub that accepts the connection but never answers: the look-up times out after
    # HF_HUB_ETAG_TIMEOUT and the cached commit of the branch is used, as for a refusal.
    sha = hub_server.add_commit("org/teacher", model_files("v1"))
    env = client_env(hub_server, tmp_path)
    run_hub(env, download("org/teacher"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections queue in the backlog; nothing ever reads them
        hung = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
                "HF_HUB_ETAG_TIMEOUT": "1"}
        started = time.monotonic()
        (result,) = run_hub(hung, download("org/teacher"))
        elapsed = time.monotonic() - started
    assert result["commit"] == sha and result["from_cache"] is True
    assert elapsed < 30


def test_a_hub_answering_503_falls_back_to_the_cached_commit(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    # An outage behind a proxy or load balancer answers 5xx: the cached commit stands in.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    sha = hub_server.add_commit("org/teacher", model_files("v1"))
    env = client_env(hub_server, tmp_path)
    run_hub(env, download("org/teacher"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        down = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        cached, unknown = run_hub(down, download("org/teacher"), download("org/other"))
    finally:
        server.shutdown()
        server.server_close()
    assert cached["commit"] == sha and cached["from_cache"] is True
    assert "503" in unknown["error"]


def test_missing_repo_revision_and_file_are_clear_errors(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    hub_server.add_commit("org/teacher", model_files("v1"))
    hub_server.add_commit("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    hub_server.add_commit("org/gated", model_files("g"), gated=True)

    no_repo, no_rev, no_weights, gated = run_hub(
        client_env(hub_server, tmp_path),
        download("org/nope"),
        download("org/teacher", "no-such-branch"),
        download("org/pickled"),
        download("org/gated"),
    )

    assert "Repo org/nope not found" in no_repo["error"]
    assert "HF_TOKEN" in no_repo["error"]
    assert "Revision 'no-such-branch' not found in org/teacher" in no_rev["error"]
    assert "has no model.safetensors" in no_weights["error"]
    assert "org/gated is gated" in gated["error"]


def test_private_repo_needs_a_token(hub_server: HubServer, tmp_path: pathlib.Path) -> None:
    sha = hub_server.add_commit("org/secret", model_files("s"), private=True)
    env = client_env(hub_server, tmp_path)

    anonymous, explicit = run_hub(
        env, download("org/secret"), download("org/secret", token=hub_server.token)
    )
    [from_env] = run_hub({**env, "HF_TOKEN": hub_server.token}, download("org/secret"))
    [bad_token] = run_hub({**env, "HF_TOKEN": "hf_wrong"}, download("org/secret"))

    assert "Repo org/secret not found" in anonymous["error"]
    assert "HF_TOKEN" in anonymous["error"]
    assert explicit["commit"] == from_env["commit"] == sha
    assert read_dir(from_env) == model_files("s")
    assert "rejected your token" in bad_token["error"]


# --- uploads ----------------------------------------------------------------------------------


def test_upload_creates_repo_and_downloads_identical_bytes(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    files = model_files("student")
    folder = write_model(tmp_path / "student", {**files, "notes.txt": b"not uploaded"})
    env = client_env(hub_server, tmp_path, HF_TOKEN=hub_server.token)

    first, again, fetched = run_hub(
        env,
        upload(folder, "org/student", private=True),
        upload(folder, "org/student"),
        download("org/student"),
    )

    repo = hub_server.repos["org/student"]
    assert repo.private
    assert first["commit"] == repo.branches["main"]
    assert again["commit"] == first["commit"]  # nothing changed: no empty commit
    on_hub = hub_server.files("org/student")
    assert on_hub.pop(".gitattributes")  # the Hub's initial commit
    assert on_hub == files
    assert fetched["commit"] == first["commit"]
    assert read_dir(fetched) == files


def test_upload_to_new_branch_leaves_main_alone(
    hub_server: HubServer, tmp_path: pathlib.Path
) -> None:
    main = hub_server.add_commit("org/student", model_files("v1"))
    folder = write_model(tmp_path / "student", model_files("exp"))
    env = client_env(hub_server, tmp_path, HF_TOKEN=hub_server.token)

    pushed, fetched = run_hub(
        env, upload(folder, "org/student", branch="kamal/exp"), download("org/student", "kamal/exp")
    )
    [offline] = run_hub({**env, "HF_HUB_OFFLINE": "1"}, download("org/student", "kamal/exp"))

    assert hub_server.repos["org/student"].branches == {"main": main, "kamal/exp": pushed["commit"]}
    assert hub_server.files("org/student", "main") == model_files("v1")
    assert fetched["commit"] == offline["commit"] == pushed["commit"]
    assert read_dir(fetched) == model_files("exp")


def test_upload_errors_say_how_to_fix(hub_server: HubServer, tmp_path: pathlib.Path) -> None:
    hub_server.add_commit("org/public", model_files("p"))
    folder = write_model(tmp_path / "m", model_files("m"))
    env = client_env(hub_server, tmp_path)

    [no_token] = run_hub(env, upload(folder, "org/new"))
    [to_public] = run_hub(
        {**env, "HF_TOKEN": hub_server.token}, upload(folder, "org/public", private=True)
    )
    [offline] = run_hub({**env, "HF_HUB_OFFLINE": "1"}, upload(folder, "org/other"))

    assert "write" in no_token["error"] and "HF_TOKEN" in no_token["error"]
    assert "org/new" not in hub_server.repos
    assert "already exists and is public" in to_public["error"]
    assert hub_server.files("org/public") == model_files("p")
    assert "offline mode is on" in offline["error"]
