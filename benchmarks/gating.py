"""Label-free gates for the digits teachers: how often each merge trusts the right teacher.

The teachers' ensemble on the digits test split with every gate measured so far: the
merges ``kamal.merging`` offers (naive, standardize, energy, learned, feature-density,
auto); the learned gate without its density refinement, without its neighbour smoothing,
fitted to the transfer images' true owners (the ceiling of a gate over the teachers'
outputs), and with self-training (EM) rounds; the teachers' steadiness over shifted copies
used directly at test time (nine passes per test image, the signal the learned gate starts
from); and class-conditional feature densities per teacher (Lee et al., NeurIPS 2018: each
teacher's pooled features modelled per class with a shared covariance, classes from its
own predictions on the transfer data, membership = the negative smallest Mahalanobis
distance, z-scored on the transfer data), fitted on all transfer images or on the
teacher's most confident ones. Beside the top-1, the gate accuracy: the fraction of test
images whose most trusted teacher is one that knows their class. The oracle gate routes by
the true label (the ceiling).

Two more tables choose the learned gate's settings on the *transfer* split (its gate is
fitted on those images without their labels; the labels only score): the owners' sharpness
x the neighbours they are averaged over, and the density refinement's ridge x rounds. The
test split is never used to choose. Apart from the true-owners row, labels are read only to
score. Rewrites the "gating" section of docs/benchmarks.md and its key in
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
SHARPNESS_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0)  # must hold kamal.gating.DENSITY_RIDGE
ROUNDS_GRID = (0, 1, 3, 10, 30)


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


def owner_accuracy(owners: Tensor, teachers: list[Any], labels: Tensor, target: Any) -> float:
    """How often the most trusted teacher knows the image's class."""
    knows = torch.stack([torch.tensor([target.classes[int(y)] in t.tasks[0].classes for y in labels])
                         for t in teachers], 1)
    return float(knows[torch.arange(len(labels)), owners.argmax(1)].float().mean())


def learned_rows(teachers: list[Any], target: Any, readings: Any, labels: Tensor,
                 out_test: list[dict[str, Tensor]], transfer: Any) -> dict[str, dict[str, float]]:
    """The learned gate as shipped, as ``feature-density``, without the density refinement,
    without neighbour smoothing, with owners read from rescaled logits, fitted to the true
    owners of the ``transfer`` images (its ceiling: the only row that reads their labels),
    and after EM rounds (the gate's own posteriors, averaged over the nine views and
    smoothed, as the next owners). Each fit starts afresh from the readings."""
    from kamal.gating import neighbour_average
    from kamal.merging import LogitMerger

    merger = LogitMerger(teachers, [target], "learned")
    pairs = merger.classified

    def scored() -> dict[str, float]:
        with torch.no_grad():
            top1 = float(merger(out_test)["digits"].argmax(1).eq(labels).float().mean())
            gate = merger.gate(merger.gate_inputs([o[t.tasks[0].name] for t, o
                                                    in zip(teachers, out_test, strict=True)]))
        return {"top1": top1, "gate": owner_accuracy(gate, teachers, labels, target)}

    merger.fit_gate(readings)
    shipped = scored()
    scales = [float(merger.logit_scale[i]) for i, _ in pairs]
    rows = {}
    merger.fit_gate(readings, readings.owners(pairs, steadiness=False))
    rows["`merge: feature-density` (the refinement alone, from every teacher trusted alike)"] = scored()
    merger.fit_gate(readings, readings.owners(pairs, density_rounds=0))
    rows["`merge: learned` without the density refinement (shipped before)"] = scored()
    merger.fit_gate(readings, readings.owners(pairs, neighbours=1))
    rows["`merge: learned` without neighbour smoothing"] = scored()
    merger.fit_gate(readings, readings.owners(pairs, scales))
    rows["`merge: learned`, owners from logits rescaled to a common spread"] = scored()
    rows["`merge: learned` (as shipped)"] = shipped
    transfer_labels = target.map_targets(transfer.classes, transfer.labels)
    true_owners = torch.stack([torch.tensor([target.classes[int(y)] in t.tasks[0].classes
                                             for y in transfer_labels]) for t in teachers], 1)
    merger.fit_gate(readings, true_owners.float() / true_owners.sum(1, keepdim=True))
    rows["`merge: learned` fitted to the true owners (transfer labels; the gate's ceiling)"] = scored()
    merger.fit_gate(readings)
    representations = [f for f in readings.features if f is not None]
    views = [readings.logits, *readings.shifted]
    for round_ in (1, 2, 3):
        with torch.no_grad():
            posterior = torch.stack([merger.gate(merger.gate_inputs(v)).exp() for v in views]).mean(0)
        merger.fit_gate(readings, neighbour_average(representations, posterior))
        rows[f"`merge: learned` + {round_} EM round{'s' if round_ > 1 else ''}"] = scored()
    return rows


def tuning(teachers: list[Any], target: Any, transfer: Any, readings: Any
           ) -> tuple[str, dict[str, Any]]:
    """The learned merge's top-1 on the transfer split (the images its gate is fitted on,
    without their labels) for each owners' sharpness x neighbours."""
    import kamal.gating as gating
    from kamal.merging import LogitMerger

    merger = LogitMerger(teachers, [target], "learned")
    labels = target.map_targets(transfer.classes, transfer.labels)
    outputs = [{t.tasks[0].name: logits} for t, logits in zip(teachers, readings.logits, strict=True)]
    grid = {}
    for sharpness in SHARPNESS_GRID:
        for k in (1, 3, 5, 10, 20):
            merger.fit_gate(readings, readings.owners(merger.classified, None, sharpness, k))
            with torch.no_grad():
                grid[(sharpness, k)] = float(merger(outputs)["digits"].argmax(1).eq(labels)
                                             .float().mean())
    shipped = (gating.OWNER_SHARPNESS, gating.NEIGHBOURS)
    best = max(grid, key=lambda key: (grid[key], key == shipped))  # a tie: the shipped one
    lines = ["| owners' sharpness | 1 neighbour (none) | 3 | 5 | 10 | 20 |",
             "|---|---|---|---|---|---|"]
    for sharpness in SHARPNESS_GRID:
        cells = [f"{100 * grid[(sharpness, k)]:.1f}%" for k in (1, 3, 5, 10, 20)]
        cells = [f"**{c}** (shipped)" if (sharpness, k) == shipped else c
                 for c, k in zip(cells, (1, 3, 5, 10, 20), strict=True)]
        lines.append(f"| {sharpness:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Ensemble top-1 on the transfer split. Best: sharpness {best[0]:g}, {best[1]} "
              f"neighbours ({100 * grid[best]:.1f}%); shipped: {100 * grid[shipped]:.1f}%."]
    return "\n".join(lines), {"grid": {f"{s:g}x{k}": v for (s, k), v in grid.items()},
                              "best": list(best), "shipped_setting": list(shipped),
                              "shipped": grid[shipped]}


def density_tuning(teachers: list[Any], target: Any, transfer: Any, readings: Any
                   ) -> tuple[str, dict[str, Any]]:
    """The density refinement's ridge x rounds on the transfer split: how often the owners'
    largest share goes to a teacher that knows the image's class, and the learned merge's
    top-1 with its gate fitted to those owners (the labels only score)."""
    import kamal.gating as gating
    from kamal.merging import LogitMerger

    merger = LogitMerger(teachers, [target], "learned")
    labels = target.map_targets(transfer.classes, transfer.labels)
    outputs = [{t.tasks[0].name: logits} for t, logits in zip(teachers, readings.logits, strict=True)]
    grid: dict[tuple[float, int], tuple[float, float]] = {}
    for ridge in RIDGE_GRID:
        for rounds in ROUNDS_GRID:
            owners = readings.owners(merger.classified, density_rounds=rounds, ridge=ridge)
            merger.fit_gate(readings, owners)
            with torch.no_grad():
                top1 = float(merger(outputs)["digits"].argmax(1).eq(labels).float().mean())
            grid[(ridge, rounds)] = (owner_accuracy(owners, teachers, labels, target), top1)
    shipped = (gating.DENSITY_RIDGE, gating.DENSITY_ROUNDS)
    best = max(grid, key=lambda key: (grid[key][1], grid[key][0], key == shipped))
    lines = ["| ridge | " + " | ".join(f"{r} round{'s' if r != 1 else ''}" for r in ROUNDS_GRID) + " |",
             "|---|" + "---|" * len(ROUNDS_GRID)]
    for ridge in RIDGE_GRID:
        cells = [f"{100 * grid[(ridge, r)][0]:.1f}% / {100 * grid[(ridge, r)][1]:.1f}%"
                 + (" (shipped)" if (ridge, r) == shipped else "") for r in ROUNDS_GRID]
        lines.append(f"| {ridge:g} | " + " | ".join(cells) + " |")
    lines += ["", "Owner accuracy / ensemble top-1 on the transfer split (0 rounds: the owners "
              f"before the refinement). Best ensemble: ridge {best[0]:g}, {best[1]} rounds "
              f"({100 * grid[best][1]:.1f}%); shipped: {100 * grid[shipped][1]:.1f}%."]
    return "\n".join(lines), {"grid": {f"{r:g}x{n}": list(v) for (r, n), v in grid.items()},
                              "best": list(best), "shipped_setting": list(shipped),
                              "shipped": list(grid[shipped]),
                              "unrefined": list(grid[(shipped[0], 0)])}


def main() -> None:
    from kamal import ClassificationTask, load_teacher
    from kamal.data.digits import build_digits
    from kamal.gating import read_teachers
    from kamal.merging import LogitMerger, oracle_merge

    teachers = [load_teacher(name, TEACHERS / name) for name in ("digits-0-4", "digits-5-9")]
    transfer, test = build_digits("transfer", size=16), build_digits("test", size=16)
    target = ClassificationTask.merge([t.tasks[0] for t in teachers], "digits")
    out_transfer, f_transfer = teacher_outputs(teachers, transfer.images)
    out_test, f_test = teacher_outputs(teachers, test.images)
    labels = target.map_targets(test.classes, test.labels)
    results: dict[str, dict[str, float]] = {}
    for mode in ("naive", "standardize", "energy", "auto"):
        merger = LogitMerger(teachers, [target], mode)
        merger.calibrate(teachers, [transfer.images])
        label = f"`merge: {mode}`" + (f" (picked {merger.active})" if mode == "auto" else "")
        top1 = float(merger(out_test)["digits"].argmax(1).eq(labels).float().mean())
        if merger.active in ("naive", "learned"):
            results[label] = {"top1": top1}
            continue
        gates = [merger.membership(i, o[t.tasks[0].name])
                 for i, (t, o) in enumerate(zip(teachers, out_test, strict=True))]
        results[label] = {"top1": top1, "gate": merged_top1(teachers, target, out_test, gates,
                                                            labels)[1]}
    pairs = LogitMerger(teachers, [target]).classified
    readings = read_teachers(teachers, pairs, [transfer.images])  # once, for every learned row
    results.update(learned_rows(teachers, target, readings, labels, out_test, transfer))
    # the signal itself, read on the test images (no neighbours: they are not transfer images)
    owners = read_teachers(teachers, pairs, [test.images]).owners(pairs, neighbours=1,
                                                                 density_rounds=0)
    results["view steadiness at test time (nine passes per test image; not a merge)"] = {
        "top1": merged_top1(teachers, target, out_test, list(owners.log().unbind(1)), labels)[0],
        "gate": owner_accuracy(owners, teachers, labels, target)}
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
    lines = ["## Gating: which teacher each merge trusts (digits)", "",
             "| gate | ensemble top-1 | gate accuracy |", "|---|---|---|"]
    for label, values in results.items():
        gate = f"{100 * values['gate']:.1f}%" if "gate" in values else "–"
        lines.append(f"| {label} | {100 * values['top1']:.1f}% | {gate} |")
    tuned_text, tuned = tuning(teachers, target, transfer, readings)
    density_text, density = density_tuning(teachers, target, transfer, readings)
    text = "\n".join(lines + ["", "Teachers: examples/digits digits-0-4 and digits-5-9; test "
                              f"split ({len(labels)} images); gates fitted on the transfer split.",
                              "", "#### The learned gate's settings, chosen on the transfer split",
                              "", tuned_text, "", "#### The density refinement's settings, "
                              "chosen on the transfer split", "", density_text])
    print(text)
    _report.update("gating", text, {"results": results, "tuning": tuned, "density": density})


if __name__ == "__main__":
    main()
