"""cfl's own cost beside KamalEngine's recipe (issue 16, part 7), on the digits example.

Both train the same small-cnn student (width 24) from the same two teachers
(examples/digits: digits-0-4 small-cnn, digits-5-9 small-vgg) on the augmented 16 px
transfer split, batch 32, Adam 2e-3, one thread:

* ``kamalengine``: a hand-written loop that follows KamalEngine's published CFL recipe
  (Luo et al., IJCAI 2019): block3 features of the three networks into a common space (per
  network a 1x1 conv-BN-ReLU alignment to C/4 of the student's channels, a shared extractor
  of two residual blocks, a 1x1 decoder per teacher), loss = KD (T=1) on the teachers'
  concatenated logits + 10 x MMD (seven Gaussian kernels, summed, L2-normalised features)
  + 10 x reconstruction MSE. Written here from the paper, not copied.
* ``cfl``: ``kamal amalgamate examples/digits/cfl.yaml`` with its defaults (learned merge,
  kernel mean, hidden floor 24, standardised teacher features, gradient cap measured every
  10 steps), and with the floor (64) and the cap's interval (every step) of the defaults
  before, one and both.

Images/s of every epoch 2+ (its steps over the time between its first and last step
start, as benchmarks/realistic.py), over ``--repeats`` runs per loop in an order rotated
every repeat; verdict: cfl's defaults at least ``TARGET`` x KamalEngine's images/s
(interquartile bounds, as benchmarks/speed.py). An epoch's rate averages its steps'
jitter, which single step gaps of one run left wide enough to leave the verdict open.

The defaults were chosen on validation data, not the test split: the full example (30
epochs) with the defaults and with the defaults before, evaluated on the digits *train*
split (the teachers' training images, never seen by the student), 3 seeds, for the
example, a width-8 student (where the floor matters most) and the default layer
``<head>:in``; the verdict: the defaults' mean at least the previous defaults' in each,
and at least ``MIN_TOP1`` in the example's.

    OMP_NUM_THREADS=1 python benchmarks/cfl_speed.py [--epochs 8] [--repeats 3]

Writes the "cfl_speed" key of docs/benchmarks.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from realistic import epoch_rates  # noqa: E402
from speed import step_clock, verdict  # noqa: E402

EXAMPLE = _report.ROOT / "examples" / "digits"
SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)
BATCH, TARGET, MIN_TOP1 = 32, 1.0, 0.90
BEFORE = ["algorithm.min_hidden=64", "algorithm.feature_grad_every=1"]
VALIDATED = {"the example (width 24, block3)": [],
             "width-8 student": ["student.architecture_kwargs.width=8"],
             "the default layer (<head>:in)": ["algorithm.layer=<head>:in"]}
SPEED_ROWS = {"kamal cfl, defaults (min_hidden: 24, feature_grad_every: 10)": [],
              "kamal cfl, min_hidden: 24, feature_grad_every: 1": BEFORE[1:],
              "kamal cfl, min_hidden: 64, feature_grad_every: 10": BEFORE[:1],
              "kamal cfl, min_hidden: 64, feature_grad_every: 1 (the defaults before)": BEFORE}


def kamalengine_loop(epochs: int) -> list[float]:
    """KamalEngine's CFL recipe as a plain PyTorch loop; images/s of epochs 2+."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader

    from kamal import KamalModel, load_teacher
    from kamal.data.digits import build_digits
    from kamal.models import merge_tasks

    torch.manual_seed(0)
    teachers = [load_teacher(n, EXAMPLE / "teachers" / n) for n in ("digits-0-4", "digits-5-9")]
    student = KamalModel("small-cnn", merge_tasks(teachers), teachers[0].input_spec,
                         {"width": 24})
    feats: dict[str, torch.Tensor] = {}
    for name, model in (("s", student), ("t0", teachers[0].model), ("t1", teachers[1].model)):
        model.features.get_submodule("block3").register_forward_hook(
            lambda _m, _i, out, key=name: feats.__setitem__(key, out))
    data = build_digits("transfer", size=16, augment=True)
    with torch.no_grad():  # one probe batch: the three networks' block3 widths
        probe = data.images[:2]
        student(probe), [t.model(probe) for t in teachers]
    channels = [int(feats[key].shape[1]) for key in ("s", "t0", "t1")]
    hidden = channels[0] // 4  # KamalEngine: C/4 of the student's channels

    def conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv_bn(hidden, hidden, 3),
                                      *conv_bn(hidden, hidden, 3)[:2])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.body(x))

    align = nn.ModuleList(nn.Sequential(*conv_bn(c, hidden, 1)) for c in channels)
    extractor = nn.Sequential(Residual(), Residual())
    decoders = nn.ModuleList(nn.Sequential(*conv_bn(hidden, hidden, 1), nn.Conv2d(hidden, c, 1))
                             for c in channels[1:])
    block = nn.ModuleList([align, extractor, decoders])

    def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = F.normalize(x.flatten(1), dim=1), F.normalize(y.flatten(1), dim=1)
        dxx, dyy, dxy = (torch.cdist(a, b).pow(2) for a, b in ((x, x), (y, y), (x, y)))
        return sum(torch.exp(-dxx / (2 * s * s)).mean() + torch.exp(-dyy / (2 * s * s)).mean()
                   - 2 * torch.exp(-dxy / (2 * s * s)).mean() for s in SIGMAS)

    loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True)
    params = list(student.parameters()) + list(block.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    starts: list[tuple[int, float]] = []
    for epoch in range(epochs):
        student.train()
        block.train()
        for images, _ in loader:
            starts.append((epoch, time.perf_counter()))
            with torch.no_grad():
                logits = [t.model(images)[t.tasks[0].name] for t in teachers]
                teacher_maps = [feats["t0"], feats["t1"]]
            out = student(images)[student.tasks[0].name]
            size = feats["s"].shape[-2:]
            maps = [feats["s"]] + [F.adaptive_avg_pool2d(m, size) if m.shape[-2:] != size
                                   else m for m in teacher_maps]
            common = [extractor(a(m)) for a, m in zip(align, maps, strict=True)]
            target = torch.cat(logits, 1)
            kd = F.kl_div(out.log_softmax(1), target.log_softmax(1), reduction="batchmean",
                          log_target=True)
            feature_mmd = sum(mmd(common[0], h) for h in common[1:])
            recon = sum(F.mse_loss(d(h), m) for d, h, m in zip(decoders, common[1:],
                                                               maps[1:], strict=True))
            loss = kd + 10 * feature_mmd + 10 * recon
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return epoch_rates(starts, BATCH)


def kamal_cfl(epochs: int, overrides: list[str], folder: Path) -> list[float]:
    from kamal import amalgamate

    with step_clock() as starts:
        amalgamate(EXAMPLE / "cfl.yaml", folder / f"cfl-{time.monotonic_ns()}", progress=False,
                   overrides=[f"train.epochs={epochs}", "algorithm.tsne_samples=0",
                              "data.eval=null", *overrides])
    return epoch_rates(starts, BATCH)


def validation_top1(overrides: list[str], seed: int, folder: Path) -> float:
    """The full example's student top-1 on the digits train split (not the test split)."""
    from kamal import amalgamate

    report = amalgamate(EXAMPLE / "cfl.yaml", folder / f"val-{time.monotonic_ns()}",
                        progress=False, overrides=[f"train.seed={seed}", "data.eval.split=train",
                                                   "algorithm.tsne_samples=0", *overrides])
    return float(report["student"]["metrics"]["digits"]["top1"])


def validate(seeds: list[int], folder: Path) -> dict[str, dict[str, list[float]]]:
    """Validation top-1 of each of ``VALIDATED``, defaults and defaults before, per seed."""
    results: dict[str, dict[str, list[float]]] = {}
    for label, setting in VALIDATED.items():
        results[label] = {
            "defaults": [validation_top1(setting, seed, folder) for seed in seeds],
            "defaults before": [validation_top1([*setting, *BEFORE], seed, folder)
                                for seed in seeds]}
    return results


def validation_verdict(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The defaults' mean validation top-1 at least the previous defaults' in every setting
    of ``VALIDATED``, and at least ``MIN_TOP1`` in the example's."""
    means = {width: {k: statistics.mean(v) for k, v in runs.items()}
             for width, runs in results.items()}
    not_lower = all(m["defaults"] >= m["defaults before"] for m in means.values())
    accurate = means[next(iter(VALIDATED))]["defaults"] >= MIN_TOP1
    return {"means": means, "not_lower": not_lower, "accurate": accurate,
            "met": not_lower and accurate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    reference_label = "KamalEngine's recipe (hand-written loop)"
    loops = [reference_label, *SPEED_ROWS]
    rates: dict[str, list[float]] = {label: [] for label in loops}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            shift = repeat % len(loops)  # rotate the order: load changes hit every loop
            for label in loops[shift:] + loops[:shift]:
                rates[label] += (kamalengine_loop(args.epochs) if label == reference_label
                                 else kamal_cfl(args.epochs, SPEED_ROWS[label], Path(tmp)))
        validation = validate(args.seeds, Path(tmp))
    reference = rates[reference_label]
    lines = ["## cfl beside KamalEngine's CFL recipe", "",
             "The digits cfl example's teachers, student and data, one thread; images/s of "
             f"each epoch 2-{args.epochs} of {args.repeats} runs per loop, the loops in an "
             "order rotated every run.", "",
             "| loop | images/s (median epoch) | interquartile | epochs | vs KamalEngine's |",
             "|---|---|---|---|---|"]
    checks = {}
    for label, values in rates.items():
        q = statistics.quantiles(values, n=4, method="inclusive")
        word, low, high = verdict(values, reference, TARGET)
        if label != next(iter(rates)):
            checks[label] = {"verdict": word, "low": low, "high": high, "target": TARGET}
        ratio = "–" if label == next(iter(rates)) else f"{low:.2f}–{high:.2f}x ({word})"
        lines.append(f"| {label} | {statistics.median(values):.0f} | {q[0]:.0f}–{q[2]:.0f} | "
                     f"{len(values)} | {ratio} |")
    lines += ["", f"Target: cfl with its defaults at least {TARGET}x KamalEngine's images/s.",
              "", f"**Validation** (the full example, top-1 on the digits train split, not the "
              f"test split; seeds {', '.join(map(str, args.seeds))}):", "",
              "| setting | defaults | defaults before (min_hidden 64, every step) |",
              "|---|---|---|"]
    decided = validation_verdict(validation)
    for width, runs in validation.items():
        cells = [f"{statistics.mean(v):.4f} ({' / '.join(f'{x:.3f}' for x in v)})"
                 for v in runs.values()]
        lines.append(f"| {width} | {' | '.join(cells)} |")
    lines += ["", f"The defaults not below the defaults before in any setting and at least "
              f"{MIN_TOP1} in the example's: **{'met' if decided['met'] else 'missed'}**."]
    text = "\n".join(lines)
    print(text)
    _report.update("cfl_speed", text, {"epoch_rates": rates, "verdicts": checks,
                                       "validation": validation,
                                       "validation_verdict": decided})


if __name__ == "__main__":
    main()
