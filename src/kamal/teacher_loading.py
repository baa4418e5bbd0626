"""Teachers from the ``teachers:`` section of a run config: a local folder or a Hub repo,
in kamal's model-repo layout or timm's (detected from ``config.json``, or ``format:``)."""

from __future__ import annotations

from pathlib import Path

from .config import TeacherRef
from .errors import KamalError
from .interfaces import Teacher
from .models.timm_models import is_timm_repo, load_timm_model
from .repo import WEIGHTS_FILE, load_teacher, sha256_of


def resolve_teacher(ref: TeacherRef, base_dir: Path, index: int) -> Teacher:
    """Load teacher ``index`` of a run; relative paths resolve against ``base_dir`` (the
    config file's folder). Errors name the config path ``teachers.<index>``."""
    key = f"teachers.{index}"
    try:
        if ref.hub is not None:
            from .hub import HubError, download_model_repo

            try:
                resolved = download_model_repo(ref.hub, ref.revision)
            except HubError as exc:
                raise KamalError(f"{key}.hub: {exc}") from None
            folder = resolved.local_dir
            source = {"hub": ref.hub, "revision": resolved.commit,
                      "requested_revision": ref.revision}
            if resolved.from_cache:  # the Hub was unreachable: the cache's commit of the ref
                source["revision_from"] = "cache"
        else:
            folder = (base_dir / ref.path).resolve() if ref.path else base_dir
            source = {"path": str(folder)}
        if ref.format == "timm" or (ref.format is None and is_timm_repo(folder)):
            model = load_timm_model(folder, ref.display_name, ref.classes)
            return Teacher(ref.display_name, model,
                           {**source, "format": "timm", "sha256": sha256_of(folder / WEIGHTS_FILE)})
        return load_teacher(ref.display_name, folder, source)
    except KamalError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(key) else f"{key}: {message}") from None
