"""Model repos on the Hugging Face Hub: download (pinned to a commit) and upload.

A kamal model repo holds ``config.json``, ``model.safetensors`` and, optionally, ``README.md``.
Everything goes through huggingface_hub and its standard cache, so ``HF_HOME``,
``HF_ENDPOINT``, ``HF_TOKEN`` / ``hf auth login`` and ``HF_HUB_OFFLINE`` work as users know them.

huggingface_hub reads those variables when it is first imported, so this module imports it
lazily (inside functions): ``import kamal.hub`` stays cheap and never imports torch, and a
caller can still set offline mode before the first Hub call.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from kamal.errors import ModelRepoError

__all__ = [
    "CONFIG_FILE",
    "HubError",
    "MODEL_CARD_FILE",
    "ResolvedRepo",
    "WEIGHTS_FILE",
    "download_model_repo",
    "parse_repo_ref",
    "upload_model_repo",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CARD_FILE = "README.md"
_REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# other libraries' repos: their preprocessing, and weights sharded with an index
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_OPTIONAL_FILES = (MODEL_CARD_FILE, PREPROCESSOR_FILE)
_DEFAULT_BRANCH = "main"  # the name huggingface_hub's cache uses for "no revision given"

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# The Hub's own rules (huggingface_hub.utils.validate_repo_id), with the namespace required:
# ASCII letters, digits, "_", "-", "."; starts and ends with a letter, digit or "_".
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")


class HubError(ModelRepoError):
    """A model repo could not be fetched from or pushed to the Hub; the message says the fix."""


@dataclass(frozen=True)
class ResolvedRepo:
    """A Hub model repo pinned to one commit, with its files in the local HF cache.

    Attributes:
        repo_id: ``org/name`` on the Hub.
        requested_revision: What the caller asked for (branch, tag or sha); None = default branch.
        commit: The 40-hex commit sha every file was fetched at; record it for provenance.
        local_dir: The HF cache snapshot folder holding ``config.json``, ``model.safetensors``
            and ``README.md`` (when the repo has one). Read-only: do not write into it.
        from_cache: True when the Hub could not be reached and ``commit`` is the one the local
            cache recorded for ``requested_revision`` (a warning was printed once).
    """

    repo_id: str
    requested_revision: str | None
    commit: str
    local_dir: pathlib.Path
    from_cache: bool = False


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"org/name@revision"`` into ``("org/name", "revision")``; no ``@`` gives None.

    Raises:
        ValueError: The repo id is not ``org/name`` in the Hub's allowed characters, or the
            revision after ``@`` is empty.
    """
    repo_id, sep, revision = ref.partition("@")
    if sep and not revision:
        raise ValueError(
            f"Hub reference {ref!r} has an empty revision after '@': write 'org/name@main', "
            "'org/name@<tag>' or 'org/name@<commit sha>', or drop the '@'."
        )
    _check_repo_id(repo_id)
    return repo_id, (revision or None)


def download_model_repo(
    repo_id: str, revision: str | None = None, *, token: str | None = None
) -> ResolvedRepo:
    """Fetch a model repo into the HF cache, pinned to the commit ``revision`` points to now.

    The revision (branch, tag, short or full sha; None = default branch) is resolved to a commit
    once, then every file is fetched at that commit, so config and weights always match. With
    ``HF_HUB_OFFLINE=1`` nothing is requested: the commit comes from the cache's refs (written
    by an earlier online download) and the files from its snapshot.

    When the Hub cannot be reached (connection error, timeout, HTTP 5xx; never 401/403/404)
    and the cache recorded a commit for ``revision``, that commit is used, as huggingface_hub,
    transformers and timm do: a warning naming it is printed once and the result has
    ``from_cache=True``. A commit sha needs no Hub when its files are cached.

    Args:
        repo_id: ``org/name`` on the Hub.
        revision: Branch, tag or commit sha; None for the repo's default branch.
        token: Hub token; None lets huggingface_hub use ``HF_TOKEN`` or ``hf auth login``.

    Raises:
        HubError: Repo, revision or a required file not found, no access, Hub unreachable, or
            offline with the repo not cached.
    """
    _check_repo_id(repo_id)
    offline = _offline()
    with _hub_errors(repo_id, revision, offline=offline):
        try:
            commit = _resolve_commit(repo_id, revision, token=token, offline=offline)
            from_cache = False
        except Exception as error:
            commit = _cached_fallback(repo_id, revision, error)
            if commit is None:
                raise
            from_cache = True
        paths = [_fetch_required(repo_id, CONFIG_FILE, commit, token, offline)]
        paths += _fetch_weights(repo_id, commit, token, offline)
        for name in _OPTIONAL_FILES:
            _fetch_optional(repo_id, name, commit, token, offline)
    if from_cache:
        _warn_cached(repo_id, revision, commit, paths[0].parent)
    return ResolvedRepo(repo_id, revision, commit, paths[0].parent, from_cache)


def upload_model_repo(
    folder: pathlib.Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload kamal model",
) -> str:
    """Push a local model repo folder to the Hub as one commit and return its sha.

    Creates the repo when missing (``private`` applies only then) and the branch when given and
    missing (started from the default branch). Uploads ``config.json``, ``model.safetensors``
    and ``README.md`` if present; other files in the folder are left out.

    Raises:
        HubError: The folder lacks a required file, offline mode is on, no write access, a repo
            asked to be private already exists as public, or the Hub is unreachable.
    """
    _check_repo_id(repo_id)
    files = _local_model_files(pathlib.Path(folder))
    if _offline():
        raise HubError(
            f"Cannot upload to {repo_id}: offline mode is on (HF_HUB_OFFLINE). "
            "Unset HF_HUB_OFFLINE to push to the Hub."
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with _hub_errors(repo_id, branch, offline=False, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_id).private:
            # exist_ok keeps an existing repo as is: never push "private" weights to a public one.
            raise HubError(
                f"{repo_id} already exists and is public, but a private upload was asked for. "
                "Make it private on the Hub first, or upload with private=False."
            )
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(name, str(path)) for name, path in files.items()]
        info = api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, revision=branch
        )
    return info.oid


def _check_repo_id(repo_id: str) -> None:
    """Raise ValueError unless ``repo_id`` is a valid ``org/name`` Hub model id."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    valid = (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) for part in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
    )
    if not valid:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', "
            "'.'; no '--' or '..'), optionally followed by '@revision', e.g. "
            "'someone/digits-5-9@main'."
        )


def _offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``, read at its import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_commit(repo_id: str, revision: str | None, *, token: str | None, offline: bool) -> str:
    """Return the full commit sha ``revision`` points to, from the Hub or (offline) the cache."""
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        return revision
    ref = revision or _DEFAULT_BRANCH
    if offline:
        sha = _cached_ref(repo_id, ref)
        if sha is None:
            raise HubError(_not_cached_message(repo_id, revision))
        return sha
    from huggingface_hub import HfApi, constants

    # huggingface_hub waits forever by default; a Hub that hangs must time out like one that
    # refuses, so the cached commit can stand in (HF_HUB_ETAG_TIMEOUT, default 10 s)
    sha = HfApi().model_info(repo_id, revision=revision, token=token,
                             timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    if not sha:
        raise HubError(f"The Hub did not return a commit sha for {repo_id}@{ref}.")
    _remember_ref(repo_id, ref, sha)
    return sha


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the Hub is down or unreachable (not: no access, not found)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is not None and status >= 500
    return isinstance(error, _transport_errors())


def _cached_fallback(repo_id: str, revision: str | None, error: BaseException) -> str | None:
    """The cached commit of ``revision`` when ``error`` says the Hub is unreachable, else None."""
    if not _unreachable(error):
        return None
    return _cached_ref(repo_id, revision or _DEFAULT_BRANCH)


_warned: set[tuple[str, str | None, str]] = set()


def _warn_cached(repo_id: str, revision: str | None, commit: str, folder: pathlib.Path) -> None:
    """Say once per process (the main one under torchrun) which cached commit stands in."""
    key = (repo_id, revision, commit)
    if key in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(key)
    from huggingface_hub import constants

    ref = f"{repo_id}@{revision or _DEFAULT_BRANCH}"
    print(f"kamal: warning: the Hub at {constants.ENDPOINT} is unreachable; using {ref} from the "
          f"local cache at commit {commit} ({folder}). It may be behind the Hub's {ref}.",
          file=sys.stderr)


def _ref_path(repo_id: str, ref: str) -> pathlib.Path:
    """Where the HF cache records which commit a branch or tag points to (documented layout)."""
    from huggingface_hub import constants

    folder = "models--" + repo_id.replace("/", "--")
    return pathlib.Path(constants.HF_HUB_CACHE) / folder / "refs" / ref


def _cached_ref(repo_id: str, ref: str) -> str | None:
    """The commit sha cached for ``ref``, or None when this branch/tag was never resolved online."""
    path = _ref_path(repo_id, ref)
    if not path.is_file():
        return None
    sha = path.read_text().strip()
    return sha if _COMMIT_SHA.fullmatch(sha) else None


def _remember_ref(repo_id: str, ref: str, sha: str) -> None:
    """Record ``ref -> sha`` in the cache so an offline run resolves the same branch name.

    Files are fetched at the sha, which does not write refs, so this is done here. Best effort
    (a read-only cache only loses offline resolution); written atomically like huggingface_hub.
    """
    path = _ref_path(repo_id, ref)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(sha)
        tmp.replace(path)
    except OSError:
        pass


def _fetch_required(
    repo_id: str, filename: str, commit: str, token: str | None, offline: bool
) -> pathlib.Path:
    """Fetch one required file at ``commit``; a file missing from the repo is a HubError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(
            repo_id, filename, revision=commit, token=token, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        raise  # not cached / unreachable: _hub_errors explains it
    except EntryNotFoundError as error:
        raise HubError(
            f"{repo_id} at commit {commit} has no {filename}. A kamal model repo holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (safetensors only, never pickle): check the repo "
            "name and revision."
        ) from error
    return pathlib.Path(path)


def _fetch_weights(
    repo_id: str, commit: str, token: str | None, offline: bool
) -> list[pathlib.Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists."""
    index = None
    if _fetch_optional(repo_id, WEIGHTS_FILE, commit, token, offline) is None:
        index = _fetch_optional(repo_id, WEIGHTS_INDEX_FILE, commit, token, offline)
    if index is None:
        return [_fetch_required(repo_id, WEIGHTS_FILE, commit, token, offline)]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as error:
        raise HubError(f"{repo_id} at commit {commit}: {WEIGHTS_INDEX_FILE} has no "
                       "weight_map") from error
    if any("/" in shard or not shard.endswith(".safetensors") for shard in shards):
        raise HubError(f"{repo_id}: {WEIGHTS_INDEX_FILE} lists files other than top-level "
                       ".safetensors shards")
    return [index] + [_fetch_required(repo_id, shard, commit, token, offline) for shard in shards]


def _fetch_optional(
    repo_id: str, filename: str, commit: str, token: str | None, offline: bool
) -> pathlib.Path | None:
    """Fetch an optional file at ``commit``; None when the repo (or offline cache) lacks it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename, revision=commit)
    if isinstance(cached, str):
        return pathlib.Path(cached)
    if cached is not None:  # the cache remembers the file is absent at this commit: no request
        return None
    try:
        path = hf_hub_download(
            repo_id, filename, revision=commit, token=token, local_files_only=offline
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return pathlib.Path(path)


def _local_model_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """The model repo files present in ``folder``; a missing required file is a HubError."""
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise HubError(
            f"{folder} is not a kamal model repo: missing {', '.join(missing)}. "
            f"A model repo folder holds {CONFIG_FILE}, {WEIGHTS_FILE} and optionally "
            f"{MODEL_CARD_FILE}; save the model first."
        )
    names = (*_REQUIRED_FILES, MODEL_CARD_FILE)
    return {name: folder / name for name in names if (folder / name).is_file()}


def _not_cached_message(repo_id: str, revision: str | None) -> str:
    """Explain that offline mode needs an earlier online download of this exact revision."""
    from huggingface_hub import constants

    ref = f"{repo_id}@{revision}" if revision else repo_id
    return (
        f"{ref} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline "
        f"mode is on (HF_HUB_OFFLINE). Run `kamal pull {ref}` while online, or unset "
        "HF_HUB_OFFLINE to download it."
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the Hub could not be reached", for the installed HTTP client."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


@contextlib.contextmanager
def _hub_errors(
    repo_id: str, revision: str | None, *, offline: bool, writing: bool = False
) -> Iterator[None]:
    """Turn huggingface_hub's typed errors into HubErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    ref = f"{repo_id}@{revision}" if revision else repo_id
    token_hint = "set HF_TOKEN or run `hf auth login`"
    try:
        yield
    except HubError:
        raise
    except GatedRepoError as error:  # subclass of RepositoryNotFoundError: must come first
        raise HubError(
            f"{repo_id} is gated: accept its access conditions at {endpoint}/{repo_id}, then "
            f"{token_hint} with a token of that account."
        ) from error
    except RepositoryNotFoundError as error:
        if writing:
            message = (
                f"Cannot write to {repo_id} on {endpoint}: the repo is not reachable with your "
                f"credentials. Uploading needs a token with write access: {token_hint}."
            )
        else:
            message = (
                f"Repo {repo_id} not found on {endpoint}. Check the name; if it is private or "
                f"gated, {token_hint}."
            )
        raise HubError(message) from error
    except RevisionNotFoundError as error:
        raise HubError(
            f"Revision {revision!r} not found in {repo_id} on {endpoint}: use an existing branch, "
            "tag or commit sha (see the repo's 'Files and versions' page)."
        ) from error
    except LocalEntryNotFoundError as error:
        if offline:
            raise HubError(_not_cached_message(repo_id, revision)) from error
        raise HubError(_unreachable_message(ref, endpoint, error)) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if writing and status in (401, 403):
            raise HubError(
                f"Not allowed to write to {repo_id} on {endpoint} (HTTP {status}): "
                f"{token_hint} with a write token."
            ) from error
        if status == 401:
            raise HubError(
                f"The Hub at {endpoint} rejected your token while fetching {ref}: check HF_TOKEN "
                "(or the token passed in), or run `hf auth login` again."
            ) from error
        raise HubError(f"The Hub at {endpoint} refused {ref} (HTTP {status}): {error}") from error
    except _transport_errors() as error:
        raise HubError(_unreachable_message(ref, endpoint, error)) from error


def _unreachable_message(ref: str, endpoint: str, error: BaseException) -> str:
    """Explain a connection failure and the two ways out: fix the network or go offline."""
    cause = error.__cause__ or error  # huggingface_hub wraps the transport error it hit
    return (
        f"Could not reach the Hub at {endpoint} for {ref} ({type(cause).__name__}: {cause}). "
        "Check your connection and HF_ENDPOINT; to work from the local cache instead (the repo "
        "must have been downloaded before), set HF_HUB_OFFLINE=1."
    )
