"""Architectures, feature taps, classification merging and model repos."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXAMPLES
from safetensors.torch import save_file

from kamal import (
    ClassificationTask,
    FeatureTap,
    InputSpec,
    KamalError,
    KamalModel,
    LogitMerger,
    ModelRepoError,
    load_model,
    save_model_repo,
)

SMALL = ["small-cnn", "small-vgg"]


CLASSIFIERS = [*SMALL, "resnet18", "resnet34", "resnet50", "mobilenet_v3_small"]


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_every_builtin_classifier_builds_and_taps_its_layers(arch):
    size = 8 if arch in SMALL else 32
    channels = 1 if arch in SMALL else 3
    task = ClassificationTask("t", list("abc"))
    model = KamalModel(arch, [task], InputSpec(channels, (size, size)), {}).eval()
    layers = [*model.feature_layers, f"{model.head_layer}:in"]
    with FeatureTap(model.features, layers) as tap, torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out["t"].shape == (2, 3)
    assert set(tap.features) == set(layers)
    assert tap.features[f"{model.head_layer}:in"].shape[0] == 2
    for module in model.features.modules():  # hooks are removed on exit
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_unknown_layer_lists_what_exists():
    model = KamalModel("small-cnn", [ClassificationTask("t", "ab")], InputSpec(1, (8, 8)))
    with pytest.raises(KamalError, match="has no layer 'block9'; nearest names: block3, block2, block1"):
        FeatureTap(model.features, ["block9"])


def test_classification_merge_embed_and_targets():
    a = ClassificationTask("a", ["cat", "dog"])
    b = ClassificationTask("b", ["dog", "fox"])
    merged = ClassificationTask.merge([a, b], "all")
    assert merged.classes == ["cat", "dog", "fox"]
    placed = merged.embed(b, torch.tensor([[1.0, 2.0]]))
    assert placed[0, 0] == float("-inf") and placed[0, 1] == 1.0 and placed[0, 2] == 2.0
    targets = merged.map_targets(["fox", "cat", "owl"], torch.tensor([0, 1, 2, -1]))
    assert targets.tolist() == [2, 0, -1, -1]
    logits = torch.randn(4, 3)
    assert merged.distill_loss(logits, logits, 4.0).abs() < 1e-6
    assert merged.distill_loss(logits, -logits, 4.0) > 0.1
    meter = merged.new_meter()
    meter.update(torch.eye(3), torch.tensor([0, 1, -1]))
    assert meter.compute()["top1"] == 1.0 and meter.compute()["samples"] == 2


def _ensemble_accuracy(teachers, merge, scale_second, data):
    from kamal.data.digits import build_digits

    transfer = build_digits("transfer", size=16).images
    images, labels = data.images, data.labels

    def outputs(x):
        out = [t(x) for t in teachers]
        name = teachers[1].tasks[0].name
        out[1] = {name: out[1][name] * scale_second}
        return out

    tasks = [ClassificationTask.merge([t.tasks[0] for t in teachers], "d")]
    merger = LogitMerger(teachers, tasks, merge)
    with torch.no_grad():
        stats = [merger.confidence_mean.clone()]
        merger.calibrate(_Scaled(teachers, scale_second), [transfer])
        assert merge == "naive" or not torch.equal(stats[0], merger.confidence_mean)
        predictions = merger(outputs(images))["d"].argmax(1)
    return (predictions == labels).float().mean().item()


class _Scaled(list):
    """The teachers, with the second one's logits multiplied (an over/under-confident source)."""

    def __init__(self, teachers, scale):
        super().__init__([teachers[0], _ScaledTeacher(teachers[1], scale)])


class _ScaledTeacher:
    def __init__(self, teacher, scale):
        self.teacher, self.scale, self.tasks = teacher, scale, teacher.tasks

    def __call__(self, x):
        return {k: v * self.scale for k, v in self.teacher(x).items()}


@pytest.mark.parametrize("merge", ["standardize", "energy", "learned", "feature-density"])
def test_calibrated_merges_resist_teachers_of_different_loudness(merge):
    from kamal import load_teacher
    from kamal.data.digits import build_digits

    folder = EXAMPLES / "digits" / "teachers"
    teachers = [load_teacher("a", folder / "digits-0-4"), load_teacher("b", folder / "digits-5-9")]
    test = build_digits("test", size=16)
    base = _ensemble_accuracy(teachers, merge, 1.0, test)
    assert base > 0.9
    # the free energy keeps the mean logit, which a 10x quieter teacher shifts: measured 7
    # points lost there, against none for the centred max logit
    # the learned gate's owners read the teachers' own sharpness, which a 10x quieter teacher
    # loses: measured 5.4 points lost there (from a base 4 points above standardize's);
    # feature-density starts from every teacher trusted alike: 1.1 points
    tolerance = {"standardize": 0.06, "energy": 0.1, "learned": 0.08, "feature-density": 0.03}[merge]
    for scale in (0.1, 10.0):
        calibrated = _ensemble_accuracy(teachers, merge, scale, test)
        naive = _ensemble_accuracy(teachers, "naive", scale, test)
        assert calibrated > base - tolerance, scale
        assert calibrated > naive + 0.15, scale


def test_the_energy_score_is_the_free_energy():
    merger = LogitMerger([], [], "energy")
    logits = torch.tensor([[2.0, 2.0, -1.0], [5.0, 0.0, 0.0]])
    assert torch.allclose(merger.score(logits), torch.logsumexp(logits, 1))
    # two equal top logits: more evidence than one alone, which the max logit cannot tell
    assert float(merger.score(logits[:1])) > 2.0 + 0.6


def test_model_repo_round_trip(tmp_path):
    task = ClassificationTask("t", "abc")
    model = KamalModel("small-vgg", [task], InputSpec(1, (8, 8), (0.3,), (0.2,)), {"width": 4})
    save_model_repo(model, tmp_path / "m", "# card\n")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"] == "small-vgg" and config["tasks"][0]["classes"] == list("abc")
    loaded = load_model(tmp_path / "m").eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.eval()(x)["t"], loaded(x)["t"])


def test_weights_that_do_not_match_are_refused(tmp_path):
    task = ClassificationTask("t", "abc")
    model = KamalModel("small-cnn", [task], InputSpec(1, (8, 8)), {"width": 4})
    save_model_repo(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture_kwargs"] = {"width": 8}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelRepoError, match="do not match architecture 'small-cnn'.*wrong shape"):
        load_model(tmp_path / "m")
    state = {k: v for k, v in model.state_dict().items() if "head" not in k}
    config["architecture_kwargs"] = {"width": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelRepoError, match="missing: net.head.bias"):
        load_model(tmp_path / "m")


def test_config_json_cannot_name_unregistered_code(tmp_path):
    model = KamalModel("small-cnn", [ClassificationTask("t", "ab")], InputSpec(1, (8, 8)))
    save_model_repo(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture"] = "os:system"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelRepoError, match="unknown architecture 'os:system'"):
        load_model(tmp_path / "m")


def test_pickle_weights_are_never_read(tmp_path):
    model = KamalModel("small-cnn", [ClassificationTask("t", "ab")], InputSpec(1, (8, 8)))
    save_model_repo(model, tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "model.safetensors")  # a pickle in disguise
    with pytest.raises(ModelRepoError, match="not a readable safetensors file"):
        load_model(tmp_path / "m")


def test_the_oracle_gate_routes_each_image_to_the_teachers_that_know_its_label():
    from kamal.merging import oracle_merge

    a, b = ClassificationTask("a", ["cat", "dog"]), ClassificationTask("b", ["dog", "owl"])
    merged = ClassificationTask.merge([a, b], "all")  # cat, dog, owl
    sources = [(0, a), (1, b)]
    # teacher a is 10x louder and confidently wrong about owls (which it does not know)
    outputs = [{"a": torch.tensor([[30.0, 0.0], [0.0, 30.0], [30.0, 0.0]])},
               {"b": torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])}]
    labels = torch.tensor([0, 1, 2])  # cat (a only), dog (both), owl (b only)
    out = oracle_merge(merged, sources, outputs, labels)
    assert out.argmax(1).tolist() == [0, 1, 2]
    assert torch.isinf(out[0, 2]) and torch.isinf(out[2, 0])  # the other teacher's classes
    log_a, log_b = torch.log_softmax(outputs[0]["a"], 1), torch.log_softmax(outputs[1]["b"], 1)
    assert torch.isclose(out[1, 1], (log_a[1, 1] + log_b[1, 0]) / 2)  # both know dog: averaged
