"""The procedural ``scenes`` dataset, paired transforms and the ``paired-folder`` dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kamal import ImageDataset, PairedDataset, PairedTransform
from kamal.data.base import build_dataset
from kamal.data.scenes import CLASSES, SPLITS, build_scenes, render_layers, render_scene
from kamal.errors import ConfigError


def test_scenes_items_classes_and_metadata():
    data = build_scenes("test", size=16, count=3)
    assert isinstance(data, ImageDataset)
    assert data.classes == list(CLASSES) and len(data.classes) >= 5
    assert (data.channels, data.size, data.augmented, len(data)) == (3, (16, 16), False, 3)
    image, target = data[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert target["segmentation"].shape == (16, 16) and target["segmentation"].dtype == torch.long
    assert target["depth"].shape == (1, 16, 16) and float(target["depth"].min()) > 0
    assert set(target["segmentation"].unique().tolist()) <= set(range(len(CLASSES)))


def test_scenes_are_deterministic_by_seed_split_and_index():
    a, b = build_scenes("train", size=16, count=6), build_scenes("train", size=16, count=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.depths, b.depths)
    longer = build_scenes("train", size=16, count=9)
    assert torch.equal(longer.images[:6], a.images)  # a larger count only appends
    other_seed = build_scenes("train", size=16, count=6, seed=1)
    other_split = build_scenes("transfer", size=16, count=6)
    assert not torch.equal(other_seed.images, a.images)
    assert not torch.equal(other_split.images, a.images)
    with pytest.raises(ValueError, match="unknown split"):
        build_scenes("val")
    assert set(SPLITS) == {"train", "transfer", "test"}


def test_depth_and_mask_follow_the_nearest_surface():
    """Every pixel shows the nearest surface: label and depth agree on occlusions."""
    checked_overlaps = 0
    for index in range(12):
        rng = np.random.default_rng((0, 0, index))
        _, layers = render_layers(rng, 24)
        _, mask, depth = render_scene(0, "train", index, 24)
        for y in range(24):
            for x in range(24):
                covering = [(layer.depth[y, x], layer.label) for layer in layers
                            if layer.cover[y, x]]
                nearest = min(d for d, _ in covering)
                assert depth[y, x] == nearest
                assert mask[y, x] in {label for d, label in covering if d == nearest}
                objects = [(d, label) for d, label in covering if label >= 2]
                if len(objects) > 1:
                    checked_overlaps += 1
                    background = min(d for d, label in covering if label < 2)
                    assert depth[y, x] < background  # an object is never behind the room
    assert checked_overlaps > 0  # the scenes really do contain occlusions


def test_floor_depth_grows_towards_the_horizon():
    _, mask, depth = render_scene(0, "test", 0, 32)
    floor_rows = [depth[y][mask[y] == 1].mean() for y in range(32) if (mask[y] == 1).sum() > 4]
    assert all(a > b for a, b in zip(floor_rows, floor_rows[1:], strict=False))
    wall = depth[mask == 0]
    assert np.allclose(wall, wall[0]) and wall[0] >= max(floor_rows)


def _block_sample(size: int = 16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[:, size // 2:] = 1
    mask[size // 4: size // 2, : size // 4] = 2
    image = torch.stack([mask.float() / 4, torch.linspace(0, 1, size).expand(size, size),
                         torch.zeros(size, size)])
    return image, {"segmentation": mask, "depth": (mask.float() + 1)[None]}


def test_paired_transform_flips_image_mask_and_depth_together():
    image, targets = _block_sample()
    torch.manual_seed(0)
    flips = 0
    for _ in range(8):
        out, t = PairedTransform(min_scale=1.0)(image, targets)
        flipped = not torch.equal(out, image)
        flips += flipped
        expect = (lambda v: v.flip(-1)) if flipped else (lambda v: v)
        assert torch.equal(out, expect(image))
        assert torch.equal(t["segmentation"], expect(targets["segmentation"]))
        assert torch.equal(t["depth"], expect(targets["depth"]))
    assert 0 < flips < 8


def test_paired_transform_crops_identically():
    image, targets = _block_sample(32)
    torch.manual_seed(1)
    for _ in range(6):
        out, t = PairedTransform(min_scale=0.6)(image, targets)
        mask, depth = t["segmentation"], t["depth"][0]
        assert out.shape == image.shape and mask.shape == (32, 32)
        assert torch.equal(depth, mask.float() + 1)  # nearest resize never blends targets
        # away from label edges the (bilinear) image still encodes the same label
        flat = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] == \
            -torch.nn.functional.max_pool2d(-mask[None, None].float(), 3, 1, 1)[0, 0]
        assert flat.sum() > 100
        assert torch.allclose(out[0][flat], mask[flat].float() / 4, atol=1e-5)


def test_augmented_scenes_keep_targets_aligned():
    data = build_scenes("train", size=16, count=2, augment=True)
    assert data.augmented
    torch.manual_seed(0)
    first = [data[0] for _ in range(6)]
    assert any(not torch.equal(first[0][0], other[0]) for other in first[1:])
    for _, target in first:
        mask, depth = target["segmentation"], target["depth"][0]
        # the wall (label 0) is the farthest surface in every augmented view
        assert (mask == 0).any()
        assert float(depth[mask == 0].min()) >= float(depth.max()) - 1e-5


def test_scenes_through_the_registry_with_option_errors():
    data = build_dataset("scenes", "test", {"size": 16, "count": 2})
    assert isinstance(data, PairedDataset) and len(data) == 2
    with pytest.raises(ConfigError, match="no option 'colour'"):
        build_dataset("scenes", "test", {"colour": True}, key="data.eval")


# --- paired folders on disk -----------------------------------------------------------


def _write_folder(root, names=("a", "b", "c"), depth_format="png"):
    from PIL import Image

    for sub in ("images", "masks", "depth"):
        (root / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        rgb = np.full((12, 20, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{name}.png")
        mask = np.zeros((12, 20), dtype=np.uint8)
        mask[:, 10:] = 1
        mask[0, 0] = 255  # void
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        depth_mm = np.full((12, 20), 1500 + 500 * i, dtype=np.uint16)
        depth_mm[0, 1] = 0  # a hole in the depth map
        if depth_format == "png":
            Image.fromarray(depth_mm).save(root / "depth" / f"{name}.png")
        else:
            np.save(root / "depth" / f"{name}.npy", depth_mm.astype(np.float32) / 1000)
    (root / "classes.txt").write_text("floor\nbox\n")


@pytest.mark.parametrize("depth_format", ["png", "npy"])
def test_paired_folder_reads_images_masks_and_depth(tmp_path, depth_format):
    _write_folder(tmp_path, depth_format=depth_format)
    data = build_dataset("paired-folder", None, {"root": str(tmp_path), "size": [12, 20]})
    assert data.classes == ["floor", "box"] and len(data) == 3 and data.size == (12, 20)
    image, target = data[1]
    assert image.shape == (3, 12, 20) and float(image.mean()) == pytest.approx(40 / 255, abs=1e-3)
    mask, depth = target["segmentation"], target["depth"]
    assert mask[0, 0] == -1 and mask[5, 3] == 0 and mask[5, 15] == 1
    assert depth[0, 5, 5] == pytest.approx(2.0) and depth[0, 0, 1] == 0


def test_paired_folder_splits_resizing_and_errors(tmp_path):
    _write_folder(tmp_path / "train")
    data = build_dataset("paired-folder", "train", {"root": str(tmp_path), "size": 8,
                                                    "classes": ["f", "b"], "augment": True})
    assert data.size == (8, 8) and data.augmented and data.classes == ["f", "b"]
    _, target = data[0]
    assert set(target["segmentation"].unique().tolist()) <= {-1, 0, 1}
    with pytest.raises(ConfigError, match="no split folder 'test'"):
        build_dataset("paired-folder", "test", {"root": str(tmp_path)})
    (tmp_path / "train" / "masks" / "b.png").unlink()
    with pytest.raises(ConfigError, match="b.png has no masks/b"):
        build_dataset("paired-folder", "train", {"root": str(tmp_path)})
    _write_folder(tmp_path / "other")
    (tmp_path / "other" / "classes.txt").write_text("floor\n")
    with pytest.raises(ConfigError, match="but only 1 classes"):
        build_dataset("paired-folder", None, {"root": str(tmp_path / "other")})


def test_each_scene_names_its_dominant_shape():
    data = build_scenes("test", size=32, count=40)
    counts = torch.stack([(data.masks == c).flatten(1).sum(1) for c in range(len(CLASSES))], 1)
    for i in range(len(data)):
        _, targets = data[i]
        label = int(targets["classification"])
        shapes = counts[i, 2:]
        if shapes.max() == 0:
            assert label == -1
        else:  # the object class showing on the most pixels
            assert CLASSES[label] in ("circle", "square", "triangle")
            assert counts[i, label] == shapes.max()
    # a classification task reads the entry by kind, mapped to its own classes by name
    from kamal import ClassificationTask

    task = ClassificationTask("shape", ["circle", "square", "triangle"])
    _, batch = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    mapped = task.map_targets(data.classes, batch)
    assert torch.equal(mapped, batch["classification"] - 2)
