"""Label-free gates for the digits teachers: how often each merge trusts the right teacher.

The teachers' ensemble on the digits test split with every gate measured so far: the merges
``kamal.merging`` offers (naive, standardize, energy) and class-conditional feature
densities (Lee et al., NeurIPS 2018: each teacher's pooled features modelled per class with
a shared covariance, classes from its own predictions on the transfer data, membership =
the negative smallest Mahalanobis distance, z-scored on the transfer data), fitted on all
transfer images or on the teacher's most confident ones. Beside the top-1, the gate
accuracy: the fraction of test images whose most trusted teacher is the one that knows
their class. The oracle gate routes by the true label (the ceiling). Labels are read only
to score. Rewrites the "gating" section of docs/benchmarks.md and its key in
docs/benchmarks.json.

    python benchmarks/gating.py        # seconds on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

TEACHERS = _report.ROOT / "examples" / "digits" / "teachers"


def teacher_outputs(teachers: list[Any], images: Tensor) -> tuple[list[dict[str, Tensor]],
                                                                 list[Tensor]]:
    """Each teacher's outputs and the pooled feature its classifier reads."""
    from kamal import FeatureTap

    outputs, features = [], []
    for teacher in teachers:
        layer = f"{teacher.model.head_layer}:in"
        with torch.no_grad(), FeatureTap(teacher.model.features, [layer]) as tap:
            outputs.append(teacher(images))
        features.append(tap.features[layer].double())
    return outputs, features


def density_scores(logits: Tensor, features: Tensor, test_features: Tensor,
                   fraction: float) -> Tensor:
    """Mahalanobis membership of the test images for one teacher, fitted on its ``fraction``
    most confident transfer images and z-scored with all transfer images' statistics."""
    from kamal.merging import confidence

    score = confidence(logits)
    keep = score >= score.quantile(1 - fraction)
    fitted, labels = features[keep], logits.argmax(1)[keep]
    classes = labels.unique()
    means = torch.stack([fitted[labels == c].mean(0) for c in classes])
    centred = fitted - means[torch.searchsorted(classes, labels)]
    covariance = centred.T @ centred / len(fitted)
    ridge = 1e-2 * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)
    precision = torch.linalg.inv(covariance + ridge)

    def membership(x: Tensor) -> Tensor:
        d = x[:, None, :] - means[None]
        return -torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values

    transfer, test = membership(features), membership(test_features)
    return (test - transfer.mean()) / transfer.std()


def merged_top1(teachers: list[Any], target: Any, outputs: list[dict[str, Tensor]],
                gates: list[Tensor], labels: Tensor) -> tuple[float, float]:
    """Top-1 of log_softmax(teacher) + gate, and the gate's accuracy (owner by label)."""
    total = count = None
    for teacher, out, gate in zip(teachers, outputs, gates, strict=True):
        task = teacher.tasks[0]
        placed = target.embed(task, torch.log_softmax(out[task.name], 1) + gate[:, None].float())
        known = torch.isfinite(placed)
        placed = torch.where(known, placed, torch.zeros_like(placed))
        total = placed if total is None else total + placed
        count = known.float() if count is None else count + known.float()
    top1 = float((total / count.clamp_min(1)).argmax(1).eq(labels).float().mean())
    owners = torch.stack([torch.tensor([str(int(y)) in t.tasks[0].classes for y in labels])
                          for t in teachers], 1)
    chosen = torch.stack(gates, 1).argmax(1)
    return top1, float(owners[torch.arange(len(labels)), chosen].float().mean())


def main() -> None:
    from kamal import ClassificationTask, load_teacher
    from kamal.data.digits import build_digits
    from kamal.merging import LogitMerger, oracle_merge

    teachers = [load_teacher(name, TEACHERS / name) for name in ("digits-0-4", "digits-5-9")]
    transfer, test = build_digits("transfer", size=16), build_digits("test", size=16)
    target = ClassificationTask.merge([t.tasks[0] for t in teachers], "digits")
    out_transfer, f_transfer = teacher_outputs(teachers, transfer.images)
    out_test, f_test = teacher_outputs(teachers, test.images)
    labels = target.map_targets(test.classes, test.labels)
    results: dict[str, dict[str, float]] = {}
    for mode in ("naive", "standardize", "energy"):
        merger = LogitMerger(teachers, [target], mode)
        merger.calibrate(teachers, [transfer.images])
        gates = [torch.zeros(len(labels)) if mode == "naive" else
                 merger.membership(i, o[t.tasks[0].name])
                 for i, (t, o) in enumerate(zip(teachers, out_test, strict=True))]
        top1 = float(merger(out_test)["digits"].argmax(1).eq(labels).float().mean())
        gate = merged_top1(teachers, target, out_test, gates, labels)[1] if mode != "naive" else None
        results[f"`merge: {mode}`"] = {"top1": top1, **({"gate": gate} if gate is not None else {})}
    for fraction in (1.0, 0.3):
        gates = [density_scores(o[t.tasks[0].name], f, g, fraction)
                 for t, o, f, g in zip(teachers, out_transfer, f_transfer, f_test, strict=True)]
        top1, gate = merged_top1(teachers, target, out_test, gates, labels)
        label = ("feature density, all transfer images" if fraction == 1 else
                 f"feature density, the {fraction:.0%} most confident transfer images")
        results[label] = {"top1": top1, "gate": gate}
    sources = [(i, t.tasks[0]) for i, t in enumerate(teachers)]
    oracle = oracle_merge(target, sources, out_test, labels).argmax(1).eq(labels).float().mean()
    results["oracle gate (true labels; the ceiling)"] = {"top1": float(oracle), "gate": 1.0}
    lines = ["| gate | ensemble top-1 | gate accuracy |", "|---|---|---|"]
    for label, values in results.items():
        gate = f"{100 * values['gate']:.1f}%" if "gate" in values else "–"
        lines.append(f"| {label} | {100 * values['top1']:.1f}% | {gate} |")
    text = "\n".join(lines + ["", "Teachers: examples/digits digits-0-4 and digits-5-9; test "
                              f"split ({len(labels)} images); gates fitted on the transfer split."])
    print(text)
    _report.update("gating", text, {"results": results})


if __name__ == "__main__":
    main()
