"""Stored augmented views (train.teacher_cache_views, FKD) and the content-addressed cache:
views re-created bit-exactly from their numbers, cached outputs equal to the teachers' own on
those views, entries recomputed exactly when their teacher, data or views change, and the
errors a user meets."""

from __future__ import annotations

import logging
import types
from typing import Literal

import pytest
import torch
from PIL import Image
from pydantic import Field

from kamal import (
    Amalgamator,
    AmalgamatorConfig,
    ConfigError,
    Interrupted,
    KamalError,
    Teacher,
    load_model,
    load_teacher,
)
from kamal.cache import CacheEntry, TeacherCache, entry_key
from kamal.data.augment import RandomCropFlip, draw_views
from kamal.data.digits import build_digits
from kamal.data.folders import build_image_folder, build_torchvision
from kamal.data.scenes import build_scenes
from kamal.data.transforms import ImageView
from kamal.data.views import StoredViewRows, StoredViewSamples
from kamal.hookspecs import hookimpl
from kamal.plugins import register_plugin, unregister_plugin
from kamal.run import amalgamate
from kamal.testing import write_run_config


def _image_folder(tmp_path, count=6, augment=True):
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        h, w = 20 + 3 * i, 30 - 2 * i  # sizes differ: the crop numbers do not depend on them
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"{i}.png")
    return build_image_folder(root=str(tmp_path), size=16, augment=augment)


def _torchvision_folder(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "tv" / label).mkdir(parents=True)
        _image_folder(tmp_path / "tv" / label, count=3)
    return build_torchvision(variant="ImageFolder", root=str(tmp_path / "tv"), size=16,
                             augment=True)


def _datasets(tmp_path):
    return {"digits": build_digits("transfer", augment=True, size=16),
            "scenes": build_scenes("transfer", size=32, count=6, augment=True),
            "image folder": _image_folder(tmp_path),
            "torchvision ImageFolder": _torchvision_folder(tmp_path)}


def test_a_stored_view_is_recreated_bit_exactly_from_its_numbers(tmp_path):
    for name, dataset in _datasets(tmp_path).items():
        view = ImageView(dataset.channels, (16, 16))
        params = draw_views(dataset.draw_augmentation, 4, 3, seed=5)
        assert params.shape[:2] == (4, 3) and params.dtype == torch.float64, name
        assert tuple(dataset[0][0].shape[1:]) == tuple(dataset.size), name  # what it declares
        again = draw_views(dataset.draw_augmentation, 4, 3, seed=5)
        assert torch.equal(params, again), name  # the same seed draws the same views
        rows = StoredViewRows(dataset, (view,), params)
        first = [rows[r] for r in range(len(rows))]
        assert all(torch.equal(a, b) for a, b in zip(first, [rows[r] for r in range(len(rows))],
                                                     strict=True)), name
        assert not all(torch.equal(first[0], x) for x in first[1:3]), name  # real augmentation
        # a live read is exactly a draw from the global generator, then the same recreation
        torch.manual_seed(11)
        live = dataset.source(1)[0] if hasattr(dataset, "source") else dataset[1][0]
        torch.manual_seed(11)
        recreated = dataset.augmented_source(1, dataset.draw_augmentation())[0]
        if isinstance(live, Image.Image):
            live, recreated = view(live), view(recreated)
        assert torch.equal(live, recreated), name


def test_the_crop_box_fits_any_image_and_flips():
    crop = RandomCropFlip(min_area=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        params = crop.draw(generator)
        for width, height in ((7, 300), (300, 7), (64, 48)):
            left, top, right, bottom = crop.box(params, width, height)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    flips = [float(crop.draw(generator)[4]) for _ in range(400)]
    assert 0.4 < sum(flips) / len(flips) < 0.6
    with pytest.raises(ValueError, match="min_area"):
        RandomCropFlip(min_area=0)


def test_samples_pick_one_stored_view_at_random_and_name_its_row():
    dataset = build_digits("transfer", augment=True)
    params = draw_views(dataset.draw_augmentation, len(dataset), 4, seed=0)
    view = ImageView(1, (8, 8))
    samples, rows = StoredViewSamples(dataset, (view,), params), StoredViewRows(dataset, (view,),
                                                                                 params)
    assert len(samples) == len(dataset) and len(rows) == 4 * len(dataset)
    torch.manual_seed(0)
    picked = [samples[3] for _ in range(40)]
    assert {row for row, _ in picked} == {12, 13, 14, 15}  # every view of sample 3, no other
    assert all(torch.equal(image, rows[row]) for row, image in picked)


def test_cached_outputs_on_stored_views_equal_the_teachers_own(tiny_teachers):
    teacher = load_teacher("t", tiny_teachers[0])
    dataset = build_digits("transfer", augment=True)
    params = draw_views(dataset.draw_augmentation, len(dataset), 3, seed=0)
    rows = StoredViewRows(dataset, (teacher.input_spec.view,), params)
    cache = TeacherCache("memory", views=params)
    cache.build([CacheEntry("t", "k", rows, lambda x: (teacher(x), {}))], batch_size=64)
    picked = torch.tensor([0, 1, 2, 301, 3 * len(dataset) - 1])
    outputs, _ = cache.lookup(picked, torch.device("cpu"))
    with torch.no_grad():
        live = teacher(torch.stack([rows[int(r)] for r in picked]))
    for task, value in live.items():
        torch.testing.assert_close(outputs[0][task], value, atol=1e-5, rtol=0)


def test_entries_are_recomputed_exactly_when_their_key_changes(tmp_path, caplog):
    values = torch.randn(12, 3)
    folder = tmp_path / "cache"

    def build(keys, scales):
        cache = TeacherCache("disk", folder)
        cache.build([CacheEntry(name, key, values, lambda x, s=s: ({"t": x * s}, {}))
                     for (name, key), s in zip(keys, scales, strict=True)], batch_size=5)
        return cache

    first = build([("a", "ka"), ("b", "kb")], [1.0, 2.0])
    assert first.recomputed == ["a", "b"] and first.reused == []
    stamp = (folder / "ka" / "index.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="kamal.cache"):
        second = build([("a", "ka"), ("b", "kb2")], [1.0, 3.0])  # b's teacher changed
    assert second.recomputed == ["b"] and second.reused == ["a"]
    assert "recomputed 1 of 2 entries (b" in caplog.text
    assert (folder / "ka" / "index.json").stat().st_mtime_ns == stamp
    assert not (folder / "kb").exists()  # the stale entry is gone
    outputs, _ = second.lookup(torch.tensor([4, 11]), torch.device("cpu"))
    torch.testing.assert_close(outputs[1]["t"], values[[4, 11]] * 3.0)
    # a half-written entry (no index) is never read
    (folder / "ka" / "index.json").unlink()
    assert build([("a", "ka"), ("b", "kb2")], [1.0, 3.0]).recomputed == ["a"]


def test_the_key_follows_weights_data_and_views(tiny_teachers):
    teachers = [load_teacher(t.parent.name, t) for t in tiny_teachers]
    views = torch.zeros(5, 2, 2, dtype=torch.float64)
    base = entry_key(teachers[0], [], "data", views, "fp32")
    assert entry_key(teachers[0], [], "data", views.clone(), "fp32") == base  # content, not identity
    changed = {"weights": entry_key(teachers[1], [], "data", views, "fp32"),
               "layers": entry_key(teachers[0], ["features"], "data", views, "fp32"),
               "data": entry_key(teachers[0], [], "other data", views, "fp32"),
               "views": entry_key(teachers[0], [], "data", views + 1, "fp32"),
               "no views": entry_key(teachers[0], [], "data", None, "fp32"),
               "precision": entry_key(teachers[0], [], "data", views, "fp16")}
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    teachers[0].source.pop("sha256", None)  # no file digest: the loaded weights are hashed
    unhashed = entry_key(teachers[0], [], "data", views, "fp32")
    with torch.no_grad():
        next(teachers[0].model.parameters()).add_(1e-3)
    assert entry_key(teachers[0], [], "data", views, "fp32") != unhashed


def test_data_fingerprints_see_the_images(tmp_path):
    digits = build_digits("transfer")
    assert digits.fingerprint() == build_digits("transfer").fingerprint()
    assert digits.fingerprint() != build_digits("test").fingerprint()
    folder = _image_folder(tmp_path, augment=False)
    before = folder.fingerprint()
    Image.new("RGB", (9, 9)).save(tmp_path / "new.png")
    assert build_image_folder(root=str(tmp_path), size=16).fingerprint() != before


def _views_config(tmp_path, tiny_teachers, name, views=3, augment=True, epochs=2, **train):
    import yaml

    path = write_run_config(tmp_path / f"{name}.yaml", tiny_teachers,
                            {"name": "kd", "merge": "standardize"}, epochs=epochs)
    data = yaml.safe_load(path.read_text())
    data["data"]["transfer"]["augment"] = augment
    data["train"].update({"teacher_cache_views": views, **train})
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_run_on_stored_views_resumes_bit_exact_and_reuses_its_disk_entries(tmp_path,
                                                                              tiny_teachers):
    config = _views_config(tmp_path, tiny_teachers, "views", teacher_cache="disk")
    full = amalgamate(config, tmp_path / "full", progress=False)
    transfer = len(build_digits("transfer"))
    assert full["teacher_cache"] == {"mode": "disk", "bytes": transfer * 3 * 2 * 5 * 4}
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "cut", progress=False, interrupt_after_steps=7)
    shards = sorted((tmp_path / "cut" / "teacher_cache").glob("*/shard-*.safetensors"))
    stamps = [shard.stat().st_mtime_ns for shard in shards]
    amalgamate(config, tmp_path / "cut", progress=False, resume=True)
    assert [shard.stat().st_mtime_ns for shard in shards] == stamps
    weights = [load_model(tmp_path / run / "student").state_dict() for run in ("full", "cut")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_stored_views_train_like_live_augmentation(tmp_path, tiny_teachers):
    """The same augmentation, live or from four stored views per image: the students agree."""
    live = amalgamate(_views_config(tmp_path, tiny_teachers, "live", views=0, epochs=10,
                                    teacher_cache="off"), tmp_path / "live", progress=False)
    stored = amalgamate(_views_config(tmp_path, tiny_teachers, "stored", views=4, epochs=10),
                        tmp_path / "stored", progress=False)
    assert stored["teacher_cache"]["mode"] == "memory"
    top1 = [r["student"]["metrics"]["digits"]["top1"] for r in (live, stored)]
    assert min(top1) > 0.5 and abs(top1[0] - top1[1]) <= 0.03, top1


def test_stored_views_without_augmentation_say_what_to_change(tmp_path, tiny_teachers):
    config = _views_config(tmp_path, tiny_teachers, "plain", augment=False)
    with pytest.raises(ConfigError, match=r"teacher_cache_views: 3 .* no random augmentation; "
                                          r"turn it on .*augment: true"):
        amalgamate(config, tmp_path / "plain", progress=False)
    config = _views_config(tmp_path, tiny_teachers, "off", teacher_cache="off")
    with pytest.raises(ConfigError, match="teacher_cache_views: 3 .* teacher_cache is off"):
        amalgamate(config, tmp_path / "off", progress=False)


class ProbeConfig(AmalgamatorConfig):
    """Hyperparameters of the probing test algorithm."""

    name: Literal["teacher-probe"] = "teacher-probe"
    call_teacher: bool = Field(False, description="Run teacher 0 on each batch.")


class TeacherProbe(Amalgamator):
    """Plain KD that records how many teacher weights are held at each step."""

    name = "teacher-probe"
    Config = ProbeConfig
    held: list[int] = []

    def losses(self, batch):
        TeacherProbe.held.append(sum(p.numel() for t in self.teachers for p in t.model.parameters()))
        if self.config.call_teacher:
            self.teachers[0](batch.images)
        task = self.student.tasks[0]
        merged = torch.cat([o[t.name] for o, teacher in zip(batch.teacher_outputs, self.teachers,
                                                            strict=True) for t in teacher.tasks], 1)
        return {"kd": task.distill_loss(batch.student_outputs[task.name], merged)}


@pytest.fixture
def probe_plugin():
    plugin = types.SimpleNamespace(
        register_amalgamators=hookimpl(lambda register: register("teacher-probe", TeacherProbe)))
    register_plugin(plugin, "teacher-probe-test")
    TeacherProbe.held = []
    yield
    unregister_plugin("teacher-probe-test")


def test_teachers_are_released_while_the_student_trains_from_a_complete_cache(
        tmp_path, tiny_teachers, probe_plugin):
    full = sum(load_teacher("t", t).num_parameters() for t in tiny_teachers)
    config = write_run_config(tmp_path / "p.yaml", tiny_teachers, {"name": "teacher-probe"}, epochs=1)
    report = amalgamate(config, tmp_path / "released", progress=False)
    assert TeacherProbe.held and set(TeacherProbe.held) == {0}  # no weight held in any step
    assert [t["params"] for t in report["teachers"]] == [
        load_teacher("t", t).num_parameters() for t in tiny_teachers]  # back for the report
    assert next(iter(report["teachers"][0]["metrics"].values()))["top1"] > 0.9
    TeacherProbe.held = []
    amalgamate(config, tmp_path / "kept", progress=False, overrides=["train.release_teachers=false"])
    assert set(TeacherProbe.held) == {full}
    TeacherProbe.held = []
    amalgamate(config, tmp_path / "live", progress=False, overrides=["train.teacher_cache=off"])
    assert set(TeacherProbe.held) == {full}  # no cache: the teachers are needed


def test_teachers_are_loaded_one_at_a_time_until_the_student_trains(tmp_path, tiny_teachers,
                                                                   probe_plugin, monkeypatch):
    teachers, together = [], []
    release, restore = Teacher.release, Teacher.restore

    def tracking_release(self, lazy=False):
        release(self, lazy)
        teachers.append(self) if self not in teachers else None

    def counting_restore(self, loaded):
        restore(self, loaded)
        if not TeacherProbe.held:  # before the first training step
            together.append(sum(not t.released for t in teachers))

    monkeypatch.setattr(Teacher, "release", tracking_release)
    monkeypatch.setattr(Teacher, "restore", counting_restore)
    config = write_run_config(tmp_path / "p.yaml", tiny_teachers, {"name": "teacher-probe"}, epochs=1)
    report = amalgamate(config, tmp_path / "released", progress=False)
    assert len(teachers) == 2 and together and max(together) == 1  # loaded, run, freed in turn
    assert set(TeacherProbe.held) == {0}
    assert next(iter(report["teachers"][0]["metrics"].values()))["top1"] > 0.9  # loaded again


def test_an_algorithm_that_runs_a_released_teacher_is_told_what_to_set(tmp_path, tiny_teachers,
                                                                      probe_plugin):
    config = write_run_config(tmp_path / "p.yaml", tiny_teachers,
                              {"name": "teacher-probe", "call_teacher": True}, epochs=1)
    with pytest.raises(KamalError, match="teacher 'tiny-small-cnn-0-4' was released .*"
                                         "train.release_teachers: false"):
        amalgamate(config, tmp_path / "run", progress=False)
    amalgamate(config, tmp_path / "kept", progress=False, overrides=["train.release_teachers=false"])


def test_a_released_teacher_comes_back_only_from_unchanged_files(tmp_path, tiny_teachers):
    import shutil

    from kamal.config import TeacherRef
    from kamal.teacher_loading import load_teachers

    repo = tmp_path / "repo"
    shutil.copytree(tiny_teachers[0], repo)
    [teacher] = load_teachers([TeacherRef(name="t", path=str(repo))], tmp_path, lazy=False)
    images = build_digits("test").images[:8]
    before = teacher(images)
    teacher.release()
    assert teacher.num_parameters() == 0 and teacher.tasks  # structure kept, weights gone
    with pytest.raises(KamalError, match="teacher 't' was released .* train.release_teachers: false"):
        teacher(images)
    teacher.release(lazy=True)  # the next use loads the weights back from the same files
    torch.testing.assert_close(teacher(images), before, atol=0, rtol=0)
    teacher.release(lazy=True)
    (repo / "model.safetensors").write_bytes((tiny_teachers[1] / "model.safetensors").read_bytes())
    with pytest.raises(KamalError, match="teachers.0: the weights of 't' changed on disk"):
        teacher(images)


@pytest.mark.parametrize(("mode", "dtype", "atol"), [("memory", torch.float32, 1e-5),
                                                   ("disk", torch.float32, 1e-5),
                                                   ("memory", torch.float16, 1e-2)])
def test_a_top_k_cache_keeps_the_top_probabilities_and_the_tail_mass(tmp_path, mode, dtype, atol):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 100, generator=generator) * 3
    features = torch.randn(40, 100, generator=generator)  # not class logits: stored whole

    def entry(logit_names):
        return CacheEntry("t", "k", logits, lambda x: ({"cls": x}, {"f": features[:len(x)]}),
                          logit_names)

    cache = TeacherCache(mode, tmp_path / "cache", dtype, topk=5)
    cache.build([entry(frozenset({"cls"}))], batch_size=40)
    full = TeacherCache("memory", dtype=dtype)
    full.build([entry(frozenset())], batch_size=40)
    whole = features.numel() * dtype.itemsize
    index_and_lse = 40 * (5 * 2 + 4)  # int16 classes, a float32 log-sum-exp per row
    assert (full.nbytes - whole) == 40 * 100 * dtype.itemsize
    assert (cache.nbytes - whole) == 40 * 5 * dtype.itemsize + index_and_lse
    rows = torch.tensor([3, 17, 39])
    (out,), (feat,) = cache.lookup(rows, torch.device("cpu"))
    original, restored = logits[rows].softmax(1), out["cls"].softmax(1)
    top = original.topk(5, dim=1)
    # exact up to the stored precision (float16 logits: 11 bits)
    torch.testing.assert_close(restored.gather(1, top.indices), top.values, atol=atol, rtol=0)
    torch.testing.assert_close(restored.sum(1) - restored.gather(1, top.indices).sum(1),
                               1 - top.values.sum(1), atol=atol, rtol=0)  # the tail's mass
    assert out["cls"].shape == (3, 100) and torch.equal(out["cls"].argmax(1), logits[rows].argmax(1))
    torch.testing.assert_close(feat["f"], features[rows].to(dtype).float())


def test_a_run_with_a_top_k_cache_stores_k_logits_per_row_and_trains(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers,
                              {"name": "kd", "merge": "standardize"}, epochs=2)
    full = amalgamate(config, tmp_path / "full", progress=False,
                      overrides=["train.teacher_cache=memory"])
    top = amalgamate(config, tmp_path / "top", progress=False,
                     overrides=["train.teacher_cache=memory", "train.teacher_cache_topk=2"])
    rows = len(build_digits("transfer"))
    # per teacher and row: 2 float32 logits, 2 int16 classes, a float32 log-sum-exp
    assert top["teacher_cache"]["bytes"] == rows * 2 * (2 * 4 + 2 * 2 + 4)
    top1 = [r["student"]["metrics"]["digits"]["top1"] for r in (full, top)]
    assert abs(top1[0] - top1[1]) <= 0.05, top1
