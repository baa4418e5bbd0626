"""``scenes``: procedural RGB scenes with a class mask and a depth map per pixel, no downloads.

Each image is a room seen by a level pinhole camera: a textured back wall at a constant
depth, a checkered floor whose depth grows towards the horizon, and 2-5 objects (circle =
ball, square = box, triangle = cone) standing on the floor. An object's depth is the floor
depth at its base row, and its size in the image shrinks with that depth, so position and
size are the depth cues; colours are random, so a class can only be told by its shape.
Rendering is a z-buffer: every pixel shows (and is labelled with) the nearest surface, so
mask and depth agree on occlusions.

Images are deterministic by ``(seed, split, index)``: the splits never share an image, and
a longer ``count`` only appends images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .paired import PairedDataset, PairedTransform

CLASSES = ("wall", "floor", "circle", "square", "triangle")
SPLITS = {"train": 0, "transfer": 1, "test": 2}
DEFAULT_COUNT = {"train": 2000, "transfer": 2000, "test": 400}
FOCAL = 1.0  # image widths per unit of size at unit depth


@dataclass
class Layer:
    """One rendered surface: its class, where it covers the image, and its depth there."""

    label: int
    cover: np.ndarray   # (H, W) bool
    depth: np.ndarray   # (H, W) float, meaningful where ``cover``


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A random colour modulated by sinusoidal stripes in the surface coordinates (u, v)."""
    base = rng.uniform(0.25, 0.9, size=3)
    freq = rng.uniform(2.0, 8.0, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    amplitude = rng.uniform(0.05, 0.2)
    wave = np.sin(freq[0] * u + phase[0]) * np.sin(freq[1] * v + phase[1])
    return np.clip(base.reshape(3, *([1] * u.ndim)) * (1 + amplitude * wave[None]), 0, 1)


def render_layers(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Layer]]:
    """The RGB image (3, H, W) and every surface (background first, then objects).

    The image is already z-buffered; the layers let tests check mask and depth.
    """
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres, y down
    horizon = rng.uniform(0.15, 0.35)
    near = rng.uniform(1.0, 1.6)            # floor depth at the bottom row
    wall_depth = rng.uniform(6.0, 10.0)
    # rows below the horizon see the floor at depth near * (1 - h) / (y - h); the wall
    # stands where that depth would exceed the wall's
    floor_depth = near * (1 - horizon) / np.maximum(y - horizon, 1e-6)
    on_floor = (y > horizon) & (floor_depth <= wall_depth)
    wall = Layer(0, ~on_floor, np.full((size, size), wall_depth))
    floor = Layer(1, on_floor, np.where(on_floor, floor_depth, np.inf))

    wall_rgb = _texture(rng, x * 6, y * 6)
    lateral = (x - 0.5) * floor_depth / FOCAL          # floor coordinates (metres)
    tile = rng.uniform(0.4, 0.8)
    checker = ((np.floor(lateral / tile) + np.floor(floor_depth / tile)) % 2)[None]
    floor_rgb = np.where(checker > 0, _texture(rng, lateral, floor_depth),
                         _texture(rng, lateral, floor_depth) * 0.6)  # two random colours
    image = np.where(on_floor[None], floor_rgb, wall_rgb)
    zbuf = np.where(on_floor, floor_depth, wall_depth)
    layers = [wall, floor]

    y_wall = horizon + near * (1 - horizon) / wall_depth   # first floor row
    for _ in range(int(rng.integers(2, 6))):
        label = int(rng.integers(2, len(CLASSES)))
        base = rng.uniform(y_wall + 0.05, 1.05)              # row where it touches the floor
        depth = near * (1 - horizon) / (base - horizon)
        extent = rng.uniform(0.35, 0.8)                      # physical size
        s = FOCAL * extent / depth                            # size in image widths
        cx = rng.uniform(0.05, 0.95)
        dx, dy = x - cx, y - (base - s / 2)
        if label == 2:    # ball: a sphere, nearer in its middle
            rho2 = (dx ** 2 + dy ** 2) / (s / 2) ** 2
            cover = rho2 <= 1
            surface = depth - extent / 2 * np.sqrt(np.clip(1 - rho2, 0, 1))
            shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - rho2, 0, 1))
        elif label == 3:  # box: a face turned to the camera
            cover = (np.abs(dx) <= s / 2) & (np.abs(dy) <= s / 2)
            surface = np.full_like(x, depth)
            shade = 0.8 + 0.2 * (dx / s)
        else:             # cone seen from the side: a triangle standing on its base
            height = (base - y) / s                           # 0 at the base, 1 at the tip
            cover = (height >= 0) & (height <= 1) & (np.abs(dx) <= (1 - height) * s / 2)
            surface = np.full_like(x, depth)
            shade = 0.7 + 0.3 * height
        visible = cover & (surface < zbuf)
        u, v = dx[visible] / s * 4, dy[visible] / s * 4      # texture only where it shows
        image[:, visible] = _texture(rng, u, v) * shade[visible][None]
        zbuf[visible] = surface[visible]
        layers.append(Layer(label, cover, np.where(cover, surface, np.inf)))
    fog = 1 - 0.02 * zbuf                                      # far surfaces look hazier
    image = image * fog[None] + 0.5 * (1 - fog[None])
    image = image + rng.normal(0, 0.02, size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32), layers


def compose(layers: list[Layer]) -> tuple[np.ndarray, np.ndarray]:
    """Mask and depth of the nearest surface per pixel (the z-buffer, computed from layers)."""
    depth = np.stack([np.where(layer.cover, layer.depth, np.inf) for layer in layers])
    nearest = depth.argmin(axis=0)
    labels = np.array([layer.label for layer in layers])
    return labels[nearest], depth.min(axis=0)


def render_scene(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """Image (3, H, W), mask (H, W) and depth (H, W) of scene ``index`` of ``split``."""
    rng = np.random.default_rng((seed, SPLITS[split], index))
    image, layers = render_layers(rng, size)
    mask, depth = compose(layers)
    return image, mask, depth


def build_scenes(split: str | None = "train", size: int = 64, count: int | None = None,
                 seed: int = 0, augment: bool = False) -> PairedDataset:
    """``count`` scenes of ``split`` (train, transfer, test) at ``size`` x ``size`` pixels.

    Targets are ``{"segmentation": mask, "depth": depth, "classification": shape}``;
    classes are wall, floor, circle, square, triangle. ``shape`` is the scene's dominant
    object: the shape (circle, square or triangle) that shows on the most pixels (-1 when no
    object shows). ``augment`` adds paired random crops and flips.
    """
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}', choose one of {', '.join(SPLITS)}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    count = DEFAULT_COUNT[split] if count is None else count
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    rendered = [render_scene(seed, split, i, size) for i in range(count)]
    images = torch.from_numpy(np.stack([r[0] for r in rendered]))
    masks = torch.from_numpy(np.stack([r[1] for r in rendered]))
    depths = torch.from_numpy(np.stack([r[2] for r in rendered]).astype(np.float32))[:, None]
    return PairedDataset(images, masks, depths, CLASSES,
                         PairedTransform() if augment else None, dominant_shapes(masks))


def dominant_shapes(masks: torch.Tensor) -> torch.Tensor:
    """Per mask (N, H, W): the object class (index into ``CLASSES``) covering the most
    pixels, ties to the lower index; -1 where no object shows."""
    objects = torch.arange(2, len(CLASSES))
    counts = (masks[:, None] == objects[:, None, None]).flatten(2).sum(-1)  # (N, objects)
    best = counts.argmax(1)
    return torch.where(counts.max(1).values > 0, objects[best], -1)
