"""``kamal pull`` and ``kamal push``: verified downloads and published students."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .errors import KamalError
from .hub import download_model_repo, parse_repo_ref, upload_model_repo
from .interfaces import Student
from .repo import CONFIG_FILE, WEIGHTS_FILE, load_model, sha256_of


def load_from_hub(ref: str, token: str | None = None) -> Student:
    """Load ``org/name[@revision]`` from the Hugging Face Hub (cached, verified, strict)."""
    repo_id, revision = _parse(ref)
    resolved = download_model_repo(repo_id, revision, token=token)
    return load_model(resolved.local_dir)


def pull(ref: str, token: str | None = None) -> dict[str, Any]:
    """Download ``org/name[@revision]``, verify it loads strictly, and summarise it."""
    from safetensors import safe_open

    repo_id, revision = _parse(ref)
    resolved = download_model_repo(repo_id, revision, token=token)
    weights = resolved.local_dir / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = len(list(handle.keys()))
    except Exception as exc:  # damaged or not safetensors at all
        raise KamalError(f"{ref}: {WEIGHTS_FILE} has no valid safetensors header ({exc})") from None
    model = load_model(resolved.local_dir)  # config valid, weights match the architecture
    config = json.loads((resolved.local_dir / CONFIG_FILE).read_text())
    return {
        "repo": repo_id,
        "requested_revision": revision,
        "revision": resolved.commit,
        "revision_from": "cache" if resolved.from_cache else "hub",
        "architecture": config["architecture"],
        "architecture_kwargs": config.get("architecture_kwargs") or {},
        "tasks": [t.to_dict() for t in model.tasks],
        "input": model.input_spec.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": tensors,
        "sha256": sha256_of(weights),
        "local_dir": str(resolved.local_dir),
    }


def format_pull(summary: dict[str, Any]) -> str:
    """Human-readable summary of :func:`pull`."""
    lines = [f"{summary['repo']} @ {summary['revision']}"
             + (f" (from '{summary['requested_revision']}')" if summary["requested_revision"] else "")
             + (" [local cache: the Hub was unreachable]" if summary.get("revision_from") == "cache"
                else ""),
             f"  architecture: {summary['architecture']} {summary['architecture_kwargs'] or ''}".rstrip(),
             f"  parameters:   {summary['parameters']:,} in {summary['tensors']} tensors",
             f"  input:        {summary['input']['channels']}x{summary['input']['size'][0]}x"
             f"{summary['input']['size'][1]}"]
    for task in summary["tasks"]:
        classes = task.get("classes") or []
        more = ", ..." if len(classes) > 10 else ""
        shown = f" ({len(classes)} classes: {', '.join(classes[:10])}{more})" if classes else ""
        lines.append(f"  task:         {task['name']} [{task['kind']}]{shown}")
    lines += [f"  sha256:       {summary['sha256']}", f"  cached in:    {summary['local_dir']}"]
    return "\n".join(lines)


def push(run_dir: str | Path, repo_id: str, private: bool = False, branch: str | None = None,
         token: str | None = None) -> str:
    """Upload a run's student (or any model repo folder) with a fresh model card."""
    from .report import model_card
    from .run_folder import model_folder

    folder = Path(run_dir)
    report_file = folder / "report.json"
    student = model_folder(folder)
    load_model(student)  # never publish something that does not load
    config = json.loads((student / CONFIG_FILE).read_text())
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    card = model_card(report, config.get("amalgamation") or {}, repo_id=repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (staged / name).symlink_to((student / name).resolve())
        (staged / "README.md").write_text(card)
        return upload_model_repo(staged, repo_id, private=private, branch=branch, token=token)


def _parse(ref: str) -> tuple[str, str | None]:
    try:
        return parse_repo_ref(ref)
    except ValueError as exc:
        raise KamalError(str(exc)) from None
