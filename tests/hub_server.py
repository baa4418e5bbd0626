"""A loopback Hugging Face Hub for tests: the real huggingface_hub client talks to it over HTTP.

It emulates the part of the Hub API that huggingface_hub 2.4.0 uses to download and upload
model repos (see /work/shared/HUB-TESTING.md for the measured contract):

    GET  /api/models/{repo}[/revision/{rev}]      repo info (id, sha, private, siblings)
    GET  /api/models/{repo}/tree/{rev}            flat recursive file listing
    GET  /api/models/{repo}/refs                  branches
    HEAD|GET /{repo}/resolve/{rev}/{path}         file, with X-Repo-Commit, ETag, exact size
    POST /api/repos/create                        409 with "url" when the repo exists
    POST /api/validate-yaml                       README metadata check: always valid
    POST /api/models/{repo}/preupload/{rev}       every file "regular" (inline base64)
    POST /api/models/{repo}/commit/{rev}          NDJSON commit
    POST /api/models/{repo}/branch/{branch}       create a branch

Errors carry ``X-Error-Code`` so the client raises its typed errors. A private repo answers
RepoNotFound unless the request sends ``Authorization: Bearer <server.token>``, as the Hub
does; every write needs that token. Only 127.0.0.1 is bound.

Use the ``hub_server`` fixture (``pytest_plugins = ["hub_server"]``) or ``HubServer.start()``.
huggingface_hub reads its configuration when imported, so run the client in a subprocess
with ``server.hub_env(tmp_path)`` as its environment.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import pathlib
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

MAX_BODY = 64 * 1024 * 1024  # bounded: tests upload kilobytes
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_commit_counter = itertools.count()


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: the Hub's ETag and oid for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One commit: the full file tree at that point."""

    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A model repo: branches point at commits; ``gated`` files need the token."""

    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, full sha or unique sha prefix (>= 7 hex) names, else None."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7:
            found = [c for sha, c in self.commits.items() if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        """Add a commit on ``branch`` (created if missing) updating ``files``; return its sha."""
        parent = self.branches.get(branch)
        tree = dict(self.commits[parent].files) if parent else {}
        tree.update(files)
        seed = f"{self.repo_id}\n{parent}\n{message}\n{next(_commit_counter)}\n".encode()
        digest = hashlib.sha1(seed)
        for path in sorted(tree):
            digest.update(f"{path} {git_blob_oid(tree[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = Commit(sha, parent, message, tree)
        self.branches[branch] = sha
        return sha


class _HubHTTPError(Exception):
    """An error answer: HTTP status, optional X-Error-Code, and a message."""

    def __init__(self, status: int, code: str | None, message: str, **body: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that can close its keep-alive connections on shutdown."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Close every open connection: a client must not reuse a socket to a stopped hub."""
        with self._open_lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class HubServer:
    """An in-memory Hub on 127.0.0.1; see the module docstring for the emulated endpoints.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``, the value for ``HF_ENDPOINT``.
        token: The one valid user token: reads private/gated repos, allows every write.
        request_log: ``(method, path)`` of every request received, in order (path without query).
        repos: ``repo_id -> Repo``, to inspect what was uploaded.
    """

    def __init__(self) -> None:
        self.token = "hf_kamal_test_" + secrets.token_hex(8)
        self.request_log: list[tuple[str, str]] = []
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self._server = _Server(self)
        self._closed = False
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @classmethod
    def start(cls) -> HubServer:
        """Create a hub and start serving it in a background thread."""
        hub = cls()
        hub._thread.start()
        return hub

    def close(self) -> None:
        """Stop serving and close the listening socket and all keep-alive connections.

        Idempotent: a test may "take the hub down" before the fixture's own teardown.
        """
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
        message: str = "test commit",
    ) -> str:
        """Commit ``files`` on ``branch`` (repo and branch created if missing); return the sha.

        ``private``/``gated`` apply when the repo is created; files of earlier commits on the
        branch are kept unless overwritten.
        """
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
            return repo.commit(branch, files, message)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The file tree of ``repo_id`` at a branch or sha (KeyError if unknown)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}@{revision}")
            return dict(commit.files)

    def requests_since(self, start: int) -> list[tuple[str, str]]:
        """The requests logged after the first ``start`` ones."""
        with self.lock:
            return self.request_log[start:]

    def hub_env(self, tmp_path: pathlib.Path) -> dict[str, str]:
        """Environment for a subprocess running huggingface_hub against this hub.

        Starts from ``os.environ`` without any ``HF_*`` variable (no real token, cache or
        endpoint leaks in), with a fresh ``HF_HOME`` under ``tmp_path`` and no telemetry, xet
        or proxy traffic that could leave loopback.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        for key in ("TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env.pop(key, None)
            env.pop(key.lower(), None)
        home = tmp_path / "hf_home"
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_ETAG_TIMEOUT="5",
            HF_HUB_DOWNLOAD_TIMEOUT="10",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the Hub emulation; every answer has an exact Content-Length."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub: exercises connection reuse
    timeout = 30  # an idle keep-alive connection ends its thread
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; ``request_log`` records requests."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.request_log.append((method, path))
        # Revisions and file paths arrive percent-encoded ("refs%2Fpr%2F1"): split the raw
        # path first, then decode each segment.
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            body = self._read_body()
            self._authorized()  # the Hub rejects a wrong token on any request, public or not
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api_models(method, "/".join(parts[2:4]), parts[4:], body)
            elif parts[:3] == ["api", "repos", "create"] and method == "POST":
                self._create_repo(body)
            elif parts[:2] == ["api", "validate-yaml"] and method == "POST":
                self._send_json(200, {"errors": [], "warnings": []})
            elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                self._resolve(method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            else:
                raise _HubHTTPError(404, None, f"No route for {method} {path}")
        except _HubHTTPError as error:
            self._send_error(method, error)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding") or length > MAX_BODY:
            self.close_connection = True  # the unread body would corrupt the next request
            if length > MAX_BODY:
                raise _HubHTTPError(413, None, "Request body too large for the test hub")
            raise _HubHTTPError(411, None, "Send a Content-Length, not a chunked body")
        return self.rfile.read(length) if length else b""

    # --- auth -----------------------------------------------------------------------------

    def _authorized(self) -> bool:
        """Whether the request carries the hub's token; a wrong token is a 401, as on the Hub."""
        header = self.headers.get("Authorization")
        if header is None:
            return False
        if header != f"Bearer {self.hub.token}":
            raise _HubHTTPError(401, None, "Invalid credentials in Authorization header")
        return True

    def _require_write(self) -> None:
        if not self._authorized():
            raise _HubHTTPError(401, None, "You must be authenticated to write to the Hub")

    def _repo(self, repo_id: str) -> Repo:
        """The repo if it exists and this request may see it; RepoNotFound otherwise."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            status = 401 if self.headers.get("Authorization") is None else 404
            raise _HubHTTPError(status, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # --- read API ---------------------------------------------------------------------------

    def _api_models(self, method: str, repo_id: str, rest: list[str], body: bytes) -> None:
        with self.hub.lock:
            if method == "POST":
                self._require_write()
            repo = self._repo(repo_id)
            action = rest[0] if rest else "revision"
            revision = rest[1] if len(rest) > 1 else "main"
            if method == "GET" and action == "revision":
                self._send_json(200, self._repo_info(repo, self._commit(repo, revision)))
            elif method == "GET" and action == "tree":
                commit = self._commit(repo, revision)
                self._send_json(200, [_tree_entry(p, d) for p, d in sorted(commit.files.items())])
            elif method == "GET" and action == "refs":
                self._send_json(200, _refs(repo))
            elif method == "POST" and action == "preupload" and len(rest) == 2:
                self._preupload(repo, revision, body)
            elif method == "POST" and action == "commit" and len(rest) == 2:
                self._create_commit(repo, revision, body)
            elif method == "POST" and action == "branch" and len(rest) == 2:
                self._create_branch(repo, revision, body)
            else:
                raise _HubHTTPError(404, None, f"No route for {method} {self.path}")

    def _repo_info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def _resolve(self, method: str, repo_id: str, revision: str, filename: str) -> None:
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            if repo.gated and not self._authorized():
                raise _HubHTTPError(
                    401, "GatedRepo", "Access to this model is restricted", commit=commit.sha
                )
            data = commit.files.get(filename)
            if data is None:
                raise _HubHTTPError(404, "EntryNotFound", "Entry not found", commit=commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = _range_start(self.headers.get("Range"), len(data))
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], headers, head=method == "HEAD")

    # --- write API --------------------------------------------------------------------------

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            raise _HubHTTPError(400, None, "The test hub only creates model repos as org/name")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            self._require_write()
            if repo_id in self.hub.repos:
                raise _HubHTTPError(409, None, "You already created this model repo", url=url)
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            repo.commit("main", {".gitattributes": _GITATTRIBUTES}, "initial commit")
            self.hub.repos[repo_id] = repo
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo: Repo, revision: str, body: bytes) -> None:
        # Every file goes inline ("regular"): no LFS or xet round trip needed. The oid of the
        # file already there lets the client skip unchanged files, as on the Hub.
        commit = repo.resolve(revision)
        existing = commit.files if commit else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in json.loads(body)["files"]
        ]
        self._send_json(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _create_commit(self, repo: Repo, branch: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubHTTPError(400, None, "The commit payload must start with a header line")
        header = lines[0]["value"]
        if branch not in repo.branches:
            raise _HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise _HubHTTPError(412, None, "A commit has happened since; update parentCommit")
        files: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                raise _HubHTTPError(400, None, f"Unsupported commit operation: {line['key']}")
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        sha = repo.commit(branch, files, header.get("summary", ""))
        url = f"{self.hub.endpoint}/{repo.repo_id}/commit/{sha}"
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": url})

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch in repo.branches:
            raise _HubHTTPError(409, None, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start).sha
        self._send_json(200, {})

    # --- answers ----------------------------------------------------------------------------

    def _send_error(self, method: str, error: _HubHTTPError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if "commit" in error.body:  # the Hub tells which commit a missing file was looked up at
            headers["X-Repo-Commit"] = error.body.pop("commit")
        payload = {"error": error.message, **error.body}
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
        self._send(error.status, body, headers, head=method == "HEAD")

    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json"}, head=False)

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        # A HEAD reports the size of what a GET would send, never 0 for a non-empty file.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _tree_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}


def _refs(repo: Repo) -> dict[str, Any]:
    branches = [
        {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
        for name, sha in sorted(repo.branches.items())
    ]
    return {"branches": branches, "tags": [], "converts": []}


def _range_start(header: str | None, size: int) -> int:
    """Start offset of a ``Range: bytes=N-`` request (resumed download), 0 if none or invalid."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return 0
    try:
        start = int(header[len("bytes=") : -1])
    except ValueError:
        return 0
    return start if 0 < start < size else 0


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A fresh loopback Hub per test, stopped (connections closed) afterwards."""
    with HubServer.start() as server:
        yield server
