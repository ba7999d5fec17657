"""A scene: 2-4 tinted Fashion-MNIST garments in distinct cells of a 3×3 grid; how it is drawn and rendered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from .vocabulary import (
    BACKGROUNDS,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    NUM_ITEMS,
    NUM_ITEMS_P,
    TEXTURES,
)


@dataclass(frozen=True)
class SceneObject:
    """One garment of a scene: Fashion-MNIST category, palette colour, grid cell, source image."""

    category: int
    colour: int
    cell: int
    source_index: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int
    texture: int


def _sample_scene(rng: np.random.Generator, by_category: list[np.ndarray]) -> Scene:
    available = [c for c, pool in enumerate(by_category) if len(pool)]  # all ten, unless the source is tiny
    k = int(rng.choice(NUM_ITEMS, p=NUM_ITEMS_P))
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    objects, seen = [], set()
    for cell in cells:
        # Distinct (category, colour) pairs, so "the red tee" always refers to one object.
        while True:
            category, colour = available[int(rng.integers(len(available)))], int(rng.integers(len(COLOURS)))
            if (category, colour) not in seen:
                break
        seen.add((category, colour))
        pool = by_category[category]
        objects.append(SceneObject(category, colour, int(cell), int(pool[rng.integers(len(pool))])))
    return Scene(tuple(objects), int(rng.integers(len(BACKGROUNDS))), int(rng.integers(len(TEXTURES))))


def _render(scene: Scene, glyphs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` as a 64×64×3 uint8 image; glyph intensity is the alpha of its tint."""
    size = IMAGE_SIZE
    base = np.asarray(BACKGROUNDS[scene.background][1], dtype=np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()
    texture = TEXTURES[scene.texture]
    if texture == "speckled":
        canvas += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    elif texture == "shaded":
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        canvas += (14.0 * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]))[..., None]
    elif texture == "textured":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        period = rng.uniform(3.0, 6.0)
        canvas += (5.0 * np.sin((xx + yy) * 2 * np.pi / period) * np.sin((xx - yy) * 2 * np.pi / period))[..., None]
    edges = np.round(np.linspace(0, size, GRID + 1)).astype(int)
    for obj in scene.objects:
        glyph = PILImage.fromarray(glyphs[obj.source_index])
        extent = int(rng.integers(17, 22))  # a bit of scale variety, always inside a ~21 px cell
        glyph = np.asarray(glyph.resize((extent, extent), PILImage.BILINEAR), dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            glyph = glyph[:, ::-1]
        # Fashion-MNIST intensities follow the product's own brightness, so a dark shirt would lose its
        # tint. Normalise by the garment's bright level: a solid silhouette (alpha) with mild shading.
        inside = glyph[glyph > 0.05]
        level = max(float(np.quantile(inside, 0.9)) if inside.size else 1.0, 0.2)
        glyph = np.clip(glyph / level, 0.0, 1.0)
        top, left = edges[obj.row], edges[obj.col]
        cell_h, cell_w = edges[obj.row + 1] - top, edges[obj.col + 1] - left
        y = top + int(rng.integers(0, max(cell_h - extent, 0) + 1))
        x = left + int(rng.integers(0, max(cell_w - extent, 0) + 1))
        extent_y, extent_x = min(extent, size - y), min(extent, size - x)
        shape = glyph[:extent_y, :extent_x, None]
        alpha = np.clip(shape * 2.5, 0.0, 1.0)
        tint = np.asarray(COLOURS[obj.colour][2], dtype=np.float32) * rng.uniform(0.85, 1.0)
        region = canvas[y : y + extent_y, x : x + extent_x]
        canvas[y : y + extent_y, x : x + extent_x] = region * (1 - alpha) + tint * (0.6 + 0.4 * shape) * alpha
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)

