"""The examples/hub-formats runs: kd of a transformers ViT (32 px) and a timm EfficientNet
(24 px), and sbm of a transformers SegFormer (48 px) and DPT (32 px), each teacher reading
the images through its own eval transform. Rewrites the "hub_formats" section of
docs/benchmarks.md (and the same region in docs/teachers.md) and its key in
docs/benchmarks.json.

    python benchmarks/hub_formats.py           # needs kamal-core[transformers,timm] + sbm
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

EXAMPLE = _report.ROOT / "examples" / "hub-formats"


def _metrics(entry: dict[str, Any]) -> str:
    parts = []
    for task, values in (entry.get("metrics") or {}).items():
        for name in ("top1", "miou", "rmse"):
            if name in values:
                shown = f"{100 * values[name]:.1f}%" if name != "rmse" else f"{values[name]:.3f}"
                parts.append(f"{task} {name} {shown}")
    return "; ".join(parts)


def _reads(entry: dict[str, Any]) -> str:
    from kamal import InputSpec

    spec = InputSpec.from_dict(entry["input"])
    return f"{spec.view.describe()}, mean {list(spec.mean)}, std {list(spec.std)}"


def run(name: str, folder: Path) -> dict[str, Any]:
    import kamal

    started = time.perf_counter()
    report = kamal.amalgamate(EXAMPLE / f"{name}.yaml", folder / name, progress=False)
    return {"report": report, "seconds": round(time.perf_counter() - started, 1)}


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | model | reads | metrics (test split) | parameters |", "|---|---|---|---|---|"]
    for name, result in runs.items():
        report = result["report"]
        rows = [(f"student ({report['algorithm']})", report["student"])]
        if "ensemble" in report:
            rows.append(("teachers' ensemble", {**report["ensemble"], "input": None}))
        rows += [(f"teacher {t['name']}", t) for t in report["teachers"]]
        for label, entry in rows:
            reads = _reads(entry) if entry.get("input") else "each teacher its own"
            params = f"{entry['params']:,}" if "params" in entry else ""
            lines.append(f"| {name} | {label} | {reads} | {_metrics(entry)} | {params} |")
    seconds = ", ".join(f"{n} {r['seconds']} s" for n, r in runs.items())
    lines += ["", f"Wall time of the runs: {seconds}."]
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, Path(tmp)) for name in ("kd", "sbm")}
    text = markdown(runs)
    print(text)
    data = {name: {"seconds": r["seconds"],
                   "student": r["report"]["student"], "teachers": r["report"]["teachers"],
                   **({"ensemble": r["report"]["ensemble"]} if "ensemble" in r["report"] else {})}
            for name, r in runs.items()}
    _report.update("hub_formats", text, data)


if __name__ == "__main__":
    main()
