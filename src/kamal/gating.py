"""A label-free gate learned on the transfer data: which teacher each image belongs to.

A teacher's confidence on one view of an image is a weak sign that the image is one of its
classes: a network trained on digits 5-9 is confidently wrong on many 0-4 images. How its
belief *moves when the image is shifted* is a stronger one: on its own classes the
prediction stays put, out of them it wanders. :func:`view_ownership` turns that into a soft
owner per transfer image (the negative entropy of each teacher's prediction averaged over
nine shifted views, z-scored per teacher on the transfer data; test-time augmentation as an
out-of-distribution score). Where a teacher is confidently wrong on an image, its nearest
neighbours usually are not: :func:`neighbour_average` smooths the owners over the
:data:`NEIGHBOURS` most similar transfer images in the teachers' own feature space (the
input of each teacher's head, averaged over the views). Where both teachers are sure of an
image, :func:`density_owners` decides by where the image lies among the classes in all the
teachers' features together (a class-conditional Gaussian mixture fitted by EM). Nine
teacher passes per image are too many for every training step, so :class:`LearnedGate`, a
small MLP over the teachers' single-view outputs, is fitted once to the refined owners and
gates every step at the cost of one matrix product.

The measurements behind the choices (target sharpness, neighbours, the mixture's ridge and
rounds, and the self-training rounds that were tried and lost accuracy) are in the "gating"
section of docs/benchmarks.md, written by ``benchmarks/gating.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.transforms import ViewBatch
from .features import FeatureTap
from .interfaces import Task, Teacher
from .tasks.classification import ClassificationTask

#: Shift of the consistency views, as a fraction of each side (2 px at 16 px).
SHIFT_FRACTION = 1 / 8
#: Sharpness of the soft owners: softmax(OWNER_SHARPNESS * z) over teachers.
OWNER_SHARPNESS = 16.0
#: Transfer images (the image itself included) whose owners are averaged.
NEIGHBOURS = 10
#: EM rounds of the class-conditional Gaussian mixture that refines the owners (0: none).
DENSITY_ROUNDS = 10
#: Ridge added to that mixture's shared covariance, as a fraction of its mean variance.
DENSITY_RIDGE = 1.0


def shifted_views(images: Tensor | ViewBatch) -> list[Tensor | ViewBatch]:
    """The eight shifts of ``images`` by :data:`SHIFT_FRACTION` of their sides (edges
    replicated), the same shift in every view of a :class:`ViewBatch`."""
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if isinstance(images, ViewBatch):
        return [ViewBatch({view: _shift(x, dy, dx) for view, x in images.tensors.items()})
                for dy, dx in steps]
    return [_shift(images, dy, dx) for dy, dx in steps]


def _shift(images: Tensor, dy: int, dx: int) -> Tensor:
    if images.dim() != 4:  # not an image batch (e.g. token ids): nothing to shift
        return images
    h, w = images.shape[-2:]
    sy, sx = max(1, round(h * SHIFT_FRACTION)), max(1, round(w * SHIFT_FRACTION))
    padded = F.pad(images, (sx, sx, sy, sy), mode="replicate")
    top, left = sy - dy * sy, sx - dx * sx
    return padded[..., top:top + h, left:left + w]


@dataclass
class TeacherReadings:
    """What calibration read of the classification teachers, per (teacher, task) pair."""

    logits: list[Tensor]  # on the images as given
    shifted: list[list[Tensor]]  # per shift, per pair (held as float16 while reading)
    features: list[Tensor | None]  # per teacher: its head's input, averaged over the shifts

    def owners(self, pairs: Sequence[tuple[int, ClassificationTask]], scales: Sequence[float] | None = None,
               sharpness: float = OWNER_SHARPNESS, neighbours: int = NEIGHBOURS,
               density_rounds: int = DENSITY_ROUNDS, ridge: float = DENSITY_RIDGE,
               steadiness: bool = True) -> Tensor:
        """Soft owners ``(images, teachers)``: :func:`view_ownership` of each pair's class
        probabilities averaged over the nine views (its logits times ``scales[pair]``),
        smoothed by :func:`neighbour_average` in the teachers' feature space (their mean
        log-probabilities where a head input is unknown), then refined by
        ``density_rounds`` rounds of :func:`density_owners` in that space. Without
        ``steadiness`` the refinement starts from every teacher trusted alike (the
        ``feature-density`` merge)."""
        per_teacher: list[list[Tensor]] = [[] for _ in self.features]
        single: list[Tensor] = []  # each pair's probabilities on the images as given
        for pair, (i, _) in enumerate(pairs):
            scale = 1.0 if scales is None else scales[pair]
            views = [self.logits[pair], *(view[pair] for view in self.shifted)]
            probabilities = [torch.softmax(v.float() * scale, 1) for v in views]
            single.append(probabilities[0])
            per_teacher[i].append(torch.stack(probabilities).mean(0))
        gated = [bool(p) for p in per_teacher]
        representations = [
            value if value is not None else torch.cat([p.clamp_min(1e-12).log() for p in probs], 1)
            for value, probs, used in zip(self.features, per_teacher, gated, strict=True) if used]
        if steadiness:
            owned = view_ownership(per_teacher, gated, sharpness)
            if neighbours > 1:
                owned = neighbour_average(representations, owned, neighbours)
        else:
            owned = torch.tensor(gated, dtype=torch.float32).expand(len(self.logits[0]), -1)
            owned = owned / owned.sum(1, keepdim=True)
        return density_owners(representations, single, pairs, owned, density_rounds, ridge)


def read_teachers(teachers: Sequence[Teacher], pairs: Sequence[tuple[int, Task]],
                  images: Iterable[Tensor | ViewBatch], device: torch.device | None = None,
                  shifts: bool = True) -> TeacherReadings:
    """Run ``teachers`` over ``images`` (and, with ``shifts``, their eight shifts), keeping
    the logits of each classification ``pair`` (teacher index, task) on the CPU."""
    logits: list[list[Tensor]] = [[] for _ in pairs]
    shifted: list[list[list[Tensor]]] = [[[] for _ in pairs] for _ in range(8 if shifts else 0)]
    features: list[list[Tensor]] = [[] for _ in teachers]

    def answer(batch: Tensor | ViewBatch) -> list[Tensor]:
        outputs = {i: teachers[i](batch) for i in dict.fromkeys(i for i, _ in pairs)}
        return [outputs[i][task.name].float() for i, task in pairs]

    with head_inputs(teachers if shifts else []) as taps:
        for batch in images:
            batch = batch.to(device) if device is not None else batch
            for pair, out in enumerate(answer(batch)):
                logits[pair].append(out.cpu())
            if not shifts:
                continue
            seen: list[Tensor | None] = [None] * len(teachers)
            for v, moved in enumerate(shifted_views(batch)):
                for pair, out in enumerate(answer(moved)):
                    shifted[v][pair].append(out.half().cpu())
                for i, tap in enumerate(taps):  # read after each live pass (a cached one has none)
                    if tap is not None and tap.features:
                        value = pooled(next(iter(tap.features.values())))
                        seen[i] = value if seen[i] is None else seen[i] + value
            for i, value in enumerate(seen):
                if value is not None:
                    features[i].append((value / 8).cpu())
    return TeacherReadings([torch.cat(p) for p in logits if p],
                           [[torch.cat(p).float() for p in view if p] for view in shifted],
                           [torch.cat(p) if p else None for p in features])


def view_ownership(mean_probabilities: Sequence[Sequence[Tensor]], gated: Sequence[bool],
                   sharpness: float = OWNER_SHARPNESS) -> Tensor:
    """Soft owners ``(images, teachers)`` from each teacher's class probabilities averaged
    over the consistency views (``mean_probabilities[i]``: one tensor per classification
    task of teacher ``i``); teachers with ``gated[i]`` false own nothing."""
    columns = []
    for probabilities, used in zip(mean_probabilities, gated, strict=True):
        if not used:
            columns.append(None)
            continue
        certainty = torch.stack([(p * p.clamp_min(1e-12).log()).sum(1) for p in probabilities]).mean(0)
        spread = certainty.std().clamp_min(1e-6) if len(certainty) > 1 else 1.0  # one image: no spread
        columns.append((certainty - certainty.mean()) / spread)
    size = next(c for c in columns if c is not None).shape[0]
    z = torch.stack([c if c is not None else torch.full((size,), float("-inf")) for c in columns], 1)
    return torch.softmax(sharpness * z, dim=1)


@contextmanager
def head_inputs(teachers: Sequence[Teacher]) -> Iterator[list[FeatureTap | None]]:
    """Taps on the input of each teacher's head (``None`` for a teacher without a known
    head layer), for the forward passes run inside the block."""
    with ExitStack() as stack:
        taps: list[FeatureTap | None] = []
        for teacher in teachers:
            model = getattr(teacher, "model", None)
            head, features = getattr(model, "head_layer", None), getattr(model, "features", None)
            taps.append(stack.enter_context(FeatureTap(features, [f"{head}:in"]))
                        if head and isinstance(features, nn.Module) else None)
        yield taps


def pooled(feature: Tensor) -> Tensor:
    """One vector per image: maps ``(N, C, H, W)`` averaged over space, token sequences
    ``(N, T, D)`` over tokens."""
    if feature.dim() == 4:
        return feature.float().mean((2, 3))
    if feature.dim() == 3:
        return feature.float().mean(1)
    return feature.float().flatten(1)


def joint_features(representations: Sequence[Tensor]) -> Tensor:
    """The teachers' representations side by side, each standardised per dimension and
    weighted equally whatever its width."""
    return torch.cat([(r - r.mean(0)) / r.std(0).clamp_min(1e-6) / r.shape[1] ** 0.5
                      for r in (rep.float() for rep in representations)], 1)


def neighbour_average(representations: Sequence[Tensor], values: Tensor,
                      neighbours: int = NEIGHBOURS) -> Tensor:
    """``values`` averaged over each image's ``neighbours`` nearest images (itself included)
    by cosine similarity of the concatenated representations, each standardised per
    dimension and weighted equally whatever its width. A neighbour weighs its similarity
    above the next nearest image's, so the average moves continuously with the features
    (a hard top-k would jump when two neighbours swap places)."""
    k = min(neighbours, len(values) - 1)
    if k < 1:
        return values
    joined = F.normalize(joint_features(representations), dim=1)
    averaged = []
    for start in range(0, len(joined), 1024):
        similar, nearest = (joined[start:start + 1024] @ joined.T).topk(k + 1, dim=1)
        weights = (similar[:, :k] - similar[:, k:]).clamp_min(0)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        weights = weights / weights.sum(1, keepdim=True)
        averaged.append((weights[:, :, None] * values[nearest[:, :k]]).sum(1))
    return torch.cat(averaged)


def density_owners(representations: Sequence[Tensor], probabilities: Sequence[Tensor],
                   pairs: Sequence[tuple[int, ClassificationTask]], owners: Tensor,
                   rounds: int = DENSITY_ROUNDS, ridge: float = DENSITY_RIDGE) -> Tensor:
    """Owners refined by a class-conditional Gaussian mixture in the teachers' joint feature
    space (the generative classifier of Lee et al., NeurIPS 2018, fitted by EM over the
    union of the teachers' classes instead of per teacher).

    Two teachers can each be confident on the same image (a 9 that a 0-4 teacher calls 3, a
    3 that a 5-9 teacher calls 9); their outputs cannot tell which is right, but in the
    features of all teachers together the nines and the threes form separate clusters. Each
    image's class prior is the teachers' own probabilities with every teacher trusted
    alike (``probabilities[pair]``, over ``pairs[pair]``'s classes, matched by name); the
    mixture starts from the ``owners``' split of the image between teachers, and each round
    re-estimates the class means and one shared covariance (plus ``ridge`` times its mean
    variance) and then each image's class posterior. A teacher owns the posterior mass of
    its classes; a class several teachers know is shared equally between them.
    ``representations``: one ``(images, features)`` block per teacher, joined by
    :func:`joint_features`. No round, or a single image: ``owners`` unchanged."""
    if rounds < 1 or len(owners) < 2:  # a mixture needs at least two images
        return owners
    double = torch.float64
    features = joint_features(representations).to(double)
    count, width = features.shape
    position = {c: j for j, c in enumerate(dict.fromkeys(c for _, t in pairs for c in t.classes))}
    columns = [torch.tensor([position[c] for c in task.classes]) for _, task in pairs]
    prior = torch.zeros(count, len(position), dtype=double)
    start = torch.zeros_like(prior)
    sharing = torch.zeros(len(position), dtype=double)
    for (i, _), column, p in zip(pairs, columns, probabilities, strict=True):
        prior[:, column] += p.to(double) / len(pairs)
        start[:, column] += owners[:, i, None].to(double) * p.to(double)
        sharing[column] += 1
    posterior = start / start.sum(1, keepdim=True).clamp_min(1e-12)
    log_prior = prior.clamp_min(1e-12).log()
    for _ in range(rounds):
        mass = posterior.sum(0)
        means = posterior.T @ features / mass.clamp_min(1e-9)[:, None]
        covariance = (features.T @ features - (means.T * mass) @ means) / count
        # (a floor on the ridge: identical images have no variance to scale it by)
        covariance += ridge * covariance.diagonal().mean().clamp_min(1e-6) * torch.eye(width, dtype=double)
        precision = torch.linalg.inv(covariance)
        projected = features @ precision
        distance = ((projected * features).sum(1, keepdim=True) - 2 * projected @ means.T
                    + ((means @ precision) * means).sum(1)[None])
        posterior = torch.softmax(log_prior - 0.5 * distance, dim=1)
    refined = torch.zeros(owners.shape, dtype=double)
    for (i, _), column in zip(pairs, columns, strict=True):
        refined[:, i] += (posterior[:, column] / sharing[column]).sum(1)
    return refined.to(owners.dtype)


class LearnedGate(nn.Module):
    """``log p(teacher | image)`` from the teachers' single-view outputs: standardised
    inputs, a fixed layer of random ReLU features (drawn from a fixed seed), and a softmax
    regression on them. Only the regression is fitted, with an L2 penalty, so the fit is
    convex: the same owners give the same gate, and owners a rounding error apart (a cached
    teacher output, another batch size) give gates a rounding error apart. Its weights are
    buffers, saved with the run, never trained by the run's optimizer."""

    def __init__(self, inputs: int, teachers: int, hidden: int = 256) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(inputs))
        self.register_buffer("scale", torch.ones(inputs))
        self.register_buffer("w1", torch.zeros(hidden, inputs))
        self.register_buffer("b1", torch.zeros(hidden))
        self.register_buffer("w2", torch.zeros(teachers, hidden))
        self.register_buffer("b2", torch.zeros(teachers))

    def features(self, inputs: Tensor) -> Tensor:
        return F.relu(F.linear((inputs - self.shift) / self.scale, self.w1, self.b1))

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.log_softmax(F.linear(self.features(inputs), self.w2, self.b2), dim=1)

    @torch.enable_grad()
    def fit(self, inputs: Tensor, owners: Tensor, penalty: float = 1e-2,
            iterations: int = 300) -> None:
        """Fit to soft ``owners`` (rows sum to 1) by cross-entropy + ``penalty`` * |w2|^2,
        full batch, by L-BFGS."""
        inputs, owners = inputs.float(), owners.float()
        self.shift.copy_(inputs.mean(0))
        # a near-constant input carries no evidence: it must not be blown up into noise
        self.scale.copy_(inputs.std(0).clamp_min(1e-2) if len(inputs) > 1 else torch.ones_like(self.scale))
        generator = torch.Generator().manual_seed(0)
        width = self.w1.shape[1]
        self.w1.copy_(torch.randn(self.w1.shape, generator=generator) / width ** 0.5)
        self.b1.copy_(torch.randn(self.b1.shape, generator=generator) * 0.5)
        features = self.features(inputs).detach()
        w2 = torch.zeros_like(self.w2, requires_grad=True)
        b2 = torch.zeros_like(self.b2, requires_grad=True)
        known = owners > 0
        optimizer = torch.optim.LBFGS([w2, b2], lr=1.0, max_iter=iterations,
                                      tolerance_grad=1e-9, tolerance_change=1e-12,
                                      history_size=20, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad()
            log_p = torch.log_softmax(F.linear(features, w2, b2), dim=1)
            value = (-torch.where(known, owners * log_p, torch.zeros_like(log_p)).sum(1).mean()
                     + penalty * w2.pow(2).sum())
            value.backward()
            return value

        optimizer.step(loss)
        with torch.no_grad():
            self.w2.copy_(w2)
            self.b2.copy_(b2)
