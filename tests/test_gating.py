"""Label-free gates of the logit merger: the learned gate, ``auto``, overlapping and renamed
class sets (issue 17). The figures of the merges on the shipped teachers come from
``benchmarks/quality.py --gating``; these tests check behaviour that can fail."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import EXAMPLES, ROOT

from kamal import ClassificationTask, LogitMerger, load_model, load_teacher
from kamal.config import TeacherRef
from kamal.data.digits import build_digits
from kamal.data.views import image_batches
from kamal.errors import ConfigError
from kamal.gating import (
    DENSITY_RIDGE,
    DENSITY_ROUNDS,
    NEIGHBOURS,
    OWNER_SHARPNESS,
    density_owners,
    neighbour_average,
    read_teachers,
    shifted_views,
    view_ownership,
)
from kamal.teacher_loading import resolve_teacher

TEACHERS = EXAMPLES / "digits" / "teachers"


@pytest.fixture(scope="module")
def digits_teachers():
    return [load_teacher(name, TEACHERS / name) for name in ("digits-0-4", "digits-5-9")]


def _top1(merger, teachers, data, target):
    with torch.no_grad():
        merged = merger([t(data.images) for t in teachers])[target.name]
    return (merged.argmax(1) == target.map_targets(data.classes, data.labels)).float().mean().item()


def test_the_learned_gates_trust_the_right_teacher_more_often(digits_teachers):
    """The 5-9 teacher is confidently wrong on many 0-4 digits: the centred max logit trusts
    it there; the teachers' steadiness over shifted copies and the class clusters of their
    joint features, less."""
    transfer, test = build_digits("transfer", size=16), build_digits("test", size=16)
    target = ClassificationTask.merge([t.tasks[0] for t in digits_teachers], "digits")
    scores = {}
    for mode in ("standardize", "learned", "feature-density"):
        merger = LogitMerger(digits_teachers, [target], mode)
        merger.calibrate(digits_teachers, image_batches(transfer, 128))
        scores[mode] = _top1(merger, digits_teachers, test, target)
    assert scores["learned"] >= scores["standardize"] + 0.015, scores
    # the class-conditional mixture alone, every teacher trusted alike at the start
    assert scores["feature-density"] >= scores["standardize"] + 0.015, scores


def test_the_learned_gate_is_a_probability_and_its_merge_a_mixture():
    """Overlapping classes: the merged distribution is sum_i g_i p_i(c) over the teachers
    that know c, so it sums to 1 (not an average of log-probabilities)."""
    a, b = ClassificationTask("a", ["x", "y", "z"]), ClassificationTask("b", ["z", "y", "w"])
    teachers = [_Fixed(a), _Fixed(b)]
    target = ClassificationTask.merge([a, b], "m")
    merger = LogitMerger(teachers, [target], "learned")
    gate = merger.gate
    gate.w2.zero_()
    gate.b2.copy_(torch.tensor([0.25, 0.75]).log())  # a constant gate
    la, lb = torch.randn(4, 3), torch.randn(4, 3)
    merged = merger([{"a": la}, {"b": lb}])["m"]
    assert torch.allclose(merged.exp().sum(1), torch.ones(4), atol=1e-5)
    pa, pb = la.softmax(1), lb.softmax(1)
    expected_z = 0.25 * pa[:, 2] + 0.75 * pb[:, 0]  # "z" is a's third and b's first class
    assert torch.allclose(merged[:, target.classes.index("z")].exp(), expected_z, atol=1e-5)
    assert torch.allclose(merged[:, target.classes.index("w")].exp(), 0.75 * pb[:, 2], atol=1e-5)


def test_fixed_merges_match_shared_classes_by_name_not_position():
    a, b = ClassificationTask("a", ["3", "4", "5"]), ClassificationTask("b", ["5", "6", "3"])
    target = ClassificationTask.merge([a, b], "m")
    merger = LogitMerger([_Fixed(a), _Fixed(b)], [target], "naive")
    la, lb = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])
    merged = merger([{"a": la}, {"b": lb}])["m"][0]
    by_name = dict(zip(target.classes, merged.tolist(), strict=True))
    assert by_name == {"3": (1 + 30) / 2, "4": 2.0, "5": (3 + 10) / 2, "6": 20.0}


def test_auto_reads_no_labels(digits_teachers):
    """The choice, its figures and the fitted gate are the same with the labels poisoned."""
    target = ClassificationTask.merge([t.tasks[0] for t in digits_teachers], "digits")
    results = []
    for poison in (False, True):
        transfer = build_digits("transfer", size=16)
        if poison:
            transfer.labels = torch.randint(0, 10, transfer.labels.shape,
                                            generator=torch.Generator().manual_seed(1))
        merger = LogitMerger(digits_teachers, [target], "auto")
        merger.calibrate(digits_teachers, image_batches(transfer, 128))
        results.append((merger.active, dict(merger.agreement), merger.gate.w1.clone()))
    (picked, agreement, w1), (picked2, agreement2, w1b) = results
    assert picked == picked2 and agreement == agreement2 and torch.equal(w1, w1b)
    assert set(agreement) == {"standardize", "energy", "learned"}
    assert picked == max(agreement, key=agreement.__getitem__)


def test_view_ownership_prefers_the_steady_teacher():
    steady = torch.tensor([[0.9, 0.05, 0.05]] * 3 + [[0.34, 0.33, 0.33]])
    wandering = torch.tensor([[0.34, 0.33, 0.33]] * 3 + [[0.9, 0.05, 0.05]])
    owners = view_ownership([[steady], [wandering], []], [True, True, False])
    assert owners[:3, 0].min() > 0.9 and owners[3, 1] > 0.9
    assert torch.equal(owners[:, 2], torch.zeros(4))  # a teacher with no classes owns nothing


def test_neighbour_average_overrules_an_isolated_owner():
    points = torch.cat([torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 0.01 + 5,
                        torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) * 0.01 - 5])
    owners = torch.tensor([[1.0, 0.0]] * 12)
    owners[6:] = torch.tensor([0.0, 1.0])
    owners[0] = torch.tensor([0.0, 1.0])  # one wrong owner inside the first cluster
    smoothed = neighbour_average([points[:, :2], points[:, 2:]], owners, neighbours=5)
    assert smoothed[0, 0] > 0.5 and (smoothed.argmax(1) == torch.tensor([0] * 6 + [1] * 6)).all()


def test_density_owners_find_the_owner_where_both_teachers_are_confident():
    """Teacher a knows x and y, teacher b knows y and w: on every image each teacher is sure
    of one of its classes (a says y on w images, b says y on x images), so their outputs
    cannot gate; the images of each class form a cluster in their features, which can. The
    shared class y is shared equally between a and b."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3
    truth = torch.arange(3).repeat_interleave(40)  # x, y, w
    features = centres[truth] + torch.randn(120, 8, generator=generator)
    a, b = ClassificationTask("a", ["x", "y"]), ClassificationTask("b", ["y", "w"])
    sure = torch.tensor([0.98, 0.02])
    p_a = torch.where((truth == 0)[:, None], sure, sure.flip(0))  # x on x images, else y
    p_b = torch.where((truth == 2)[:, None], sure.flip(0), sure)  # w on w images, else y
    undecided = torch.full((120, 2), 0.5)
    owners = density_owners([features[:, :4], features[:, 4:]], [p_a, p_b], [(0, a), (1, b)],
                            undecided)
    assert torch.allclose(owners.sum(1), torch.ones(120), atol=1e-6)
    assert (owners[truth == 0, 0] > 0.9).all() and (owners[truth == 2, 1] > 0.9).all()
    assert torch.allclose(owners[truth == 1], torch.full((40, 2), 0.5), atol=0.05)
    unrefined = density_owners([features], [p_a, p_b], [(0, a), (1, b)], undecided, rounds=0)
    assert torch.equal(unrefined, undecided)  # no round: the owners it started from


def test_density_refinement_corrects_owners_on_the_digits_teachers(digits_teachers):
    """On the transfer split, the refined owners give more images to a teacher that knows
    their class than the view steadiness smoothed over neighbours alone (labels only score)."""
    transfer = build_digits("transfer", size=16)
    target = ClassificationTask.merge([t.tasks[0] for t in digits_teachers], "digits")
    pairs = LogitMerger(digits_teachers, [target], "learned").classified
    readings = read_teachers(digits_teachers, pairs, [transfer.images])
    knows_first = target.map_targets(transfer.classes, transfer.labels) < 5

    def correct(owners):
        return ((owners[:, 0] > 0.5) == knows_first).float().mean().item()

    before, after = correct(readings.owners(pairs, density_rounds=0)), correct(readings.owners(pairs))
    assert after >= before + 0.015, (before, after)


@pytest.mark.parametrize("count", [1, 2])
def test_gated_merges_calibrate_on_one_or_two_images(digits_teachers, count):
    """Too few images for a spread, a held-out half or a covariance: the merges still give
    finite distributions (one image crashed the learned gate's fit, two the mixture)."""
    images = build_digits("transfer", size=16).images
    target = ClassificationTask.merge([t.tasks[0] for t in digits_teachers], "digits")
    for mode in ("learned", "feature-density", "auto"):
        merger = LogitMerger(digits_teachers, [target], mode)
        merger.calibrate(digits_teachers, [images[:count]])
        with torch.no_grad():
            merged = merger([t(images[:8]) for t in digits_teachers])["digits"]
        assert torch.isfinite(merged.logsumexp(1)).all(), mode


def test_the_published_gate_settings_are_the_shipped_ones():
    """The tables that chose the learned gate's settings mark the shipped ones: changing a
    constant must come with ``python benchmarks/gating.py`` rerun."""
    published = json.loads((ROOT / "docs" / "benchmarks.json").read_text())["gating"]
    assert published["tuning"]["shipped_setting"] == [OWNER_SHARPNESS, NEIGHBOURS]
    assert published["density"]["shipped_setting"] == [DENSITY_RIDGE, DENSITY_ROUNDS]


def test_shifted_views_move_the_image_and_keep_its_size():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8, 8] = 1.0
    views = shifted_views(image)
    assert len(views) == 8 and all(v.shape == image.shape for v in views)
    peaks = {tuple((v[0, 0] == 1).nonzero()[0].tolist()) for v in views}
    assert peaks == {(8 + dy, 8 + dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)} - {(8, 8)}


def test_rename_merges_classes_two_teachers_name_differently(tmp_path):
    ref = TeacherRef(path=str(TEACHERS / "digits-5-9"), rename={"5": "five", "9": "nine"})
    teacher = resolve_teacher(ref, tmp_path, 0)
    assert teacher.tasks[0].classes == ["five", "6", "7", "8", "nine"]
    assert teacher.source["rename"] == {"5": "five", "9": "nine"}
    other = ClassificationTask("words", ["five", "nine", "ten"])
    merged = ClassificationTask.merge([teacher.tasks[0], other], "m")
    assert merged.classes == ["five", "6", "7", "8", "nine", "ten"]


@pytest.mark.parametrize(("rename", "words"), [
    ({"4": "x"}, ["no class '4'", "its classes are 5, 6, 7, 8, 9"]),
    ({"5": "6"}, ["makes two classes", "(6)"]),
])
def test_a_bad_rename_is_named(tmp_path, rename, words):
    with pytest.raises(ConfigError) as info:
        resolve_teacher(TeacherRef(path=str(TEACHERS / "digits-5-9"), rename=rename), tmp_path, 2)
    assert "teachers.2.rename" in str(info.value)
    for word in words:
        assert word in str(info.value)


class _Fixed:
    """A teacher known only by its task (the merger reads outputs given to it)."""

    def __init__(self, task: ClassificationTask) -> None:
        self.tasks = [task]


def test_learned_merge_survives_a_checkpoint_round_trip(digits_teachers):
    target = ClassificationTask.merge([t.tasks[0] for t in digits_teachers], "digits")
    fitted = LogitMerger(digits_teachers, [target], "learned")
    fitted.calibrate(digits_teachers, [build_digits("transfer", size=16).images[:128]])
    loaded = LogitMerger(digits_teachers, [target], "learned")
    loaded.load_state_dict(fitted.state_dict())
    outputs = [t(build_digits("test", size=16).images[:32]) for t in digits_teachers]
    assert torch.equal(fitted(outputs)["digits"], loaded(outputs)["digits"])
    assert not math.isnan(float(fitted(outputs)["digits"].exp().sum()))


def test_the_overlapping_teachers_example_merges_shared_classes_by_name(tmp_path):
    """examples/digits-overlap: three teachers (three architectures, two resolutions) whose
    class sets overlap; one epoch is enough to check the merge (the ensembles do not depend
    on the student)."""
    from kamal import amalgamate

    report = amalgamate(EXAMPLES / "digits-overlap" / "kd.yaml", tmp_path / "run",
                        progress=False, overrides=["train.epochs=1"])
    assert report["shared_classes"] == {"3": ["digits-0-4", "digits-3-7"],
                                        "4": ["digits-0-4", "digits-3-7"],
                                        "6": ["digits-3-7", "digits-6-9"],
                                        "7": ["digits-3-7", "digits-6-9"]}
    top1 = {key: report[key]["metrics"]["digits"]["top1"]
            for key in ("ensemble", "ensemble_standardize", "ensemble_naive", "ensemble_oracle")}
    assert report["ensemble"]["merge"] == "learned"
    assert top1["ensemble_oracle"] > top1["ensemble"] > top1["ensemble_standardize"] > top1[
        "ensemble_naive"], top1
    assert load_model(tmp_path / "run" / "student").tasks[0].classes == [str(d) for d in range(10)]
