"""The embedded default: "fashion-scenes", captioned scenes generated from Fashion-MNIST.

No captioned photo collection installs offline, so the default dataset is generated (DESIGN.md,
"The embedded default"). Each 64×64 RGB scene places 2-4 Fashion-MNIST garments, each tinted with
one of ten named colours, in distinct cells of a 3×3 grid on a dark, plain or lightly textured
background. Every scene gets five different captions that name items (with synonyms), colours and
positions in varied sentence forms; most captions pin down colour + item + position combinations,
so one class label is never enough to retrieve a scene. The split sizes mirror Flickr30K's shape
(10,000 / 1,000 / 1,000 by default).

Provenance. Test scenes use only the Fashion-MNIST test images (``t10k-*``). Train and validation
scenes use the Fashion-MNIST training images, split once into two disjoint pools (a fixed
permutation: the first sixth for validation, the rest for train). Each row records where its
garments come from: ``source`` ("train" / "t10k", the Fashion-MNIST file) and, per object,
``source_index`` (the index in that file), besides the public schema (``image``, ``captions``,
``image_id``).

Determinism and caching. Scene ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``, so a tiny build is a prefix of the full one. Each split is built once with
``datasets.Dataset.from_generator`` and reused from the datasets cache: the cache key is a hash of
the generator (pickled by reference, so stable across processes) and its ``gen_kwargs``, which
carry :data:`GENERATOR_VERSION`. Bump that string whenever the output of this module changes.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``, IDX format) or, when those files are missing, from the
Hub dataset ``zalando-datasets/fashion_mnist``. Both hold the same images in the same order.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image as PILImage

__all__ = [
    "FASHION_SCENES",
    "GENERATOR_VERSION",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_HUB_REPO",
    "CATEGORIES",
    "COLOURS",
    "POSITIONS",
    "TEMPLATES",
    "load_fashion_scenes",
    "load_fashion_mnist",
    "source_pools",
    "describe_scene",
]

FASHION_SCENES = "fashion-scenes"
# Part of the cache key: bump when images, captions or columns change.
GENERATOR_VERSION = "fashion-scenes-v2"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_REPO = "zalando-datasets/fashion_mnist"

IMAGE_SIZE = 64  # the distillation works at 64 px
GRID = 3  # 3×3 named positions; a cell is ~21 px, enough for a recognisable 17-21 px garment
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 10_000, "validation": 1_000, "test": 1_000}
NUM_ITEMS = (2, 3, 4)
NUM_ITEMS_P = (0.3, 0.4, 0.3)
CAPTIONS_PER_SCENE = 5

# Fashion-MNIST label order.
CATEGORIES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")

# Noun phrases per category; "{c}" is where a colour adjective goes. The flag marks plural nouns.
_NOUNS: tuple[tuple[tuple[str, bool], ...], ...] = (
    (("{c}t-shirt", False), ("{c}tee", False), ("{c}top", False), ("{c}short-sleeved top", False)),
    (("pair of {c}trousers", False), ("{c}trousers", True), ("{c}pants", True), ("pair of {c}pants", False)),
    (("{c}pullover", False), ("{c}sweater", False), ("{c}jumper", False)),
    (("{c}dress", False), ("{c}frock", False), ("{c}summer dress", False)),
    (("{c}coat", False), ("{c}jacket", False), ("{c}overcoat", False)),
    (("{c}sandal", False), ("{c}strappy sandal", False), ("{c}open-toed sandal", False)),
    (("{c}shirt", False), ("{c}button-up shirt", False), ("{c}blouse", False)),
    (("{c}sneaker", False), ("{c}trainer", False), ("{c}running shoe", False)),
    (("{c}bag", False), ("{c}handbag", False), ("{c}purse", False)),
    (("{c}ankle boot", False), ("{c}boot", False), ("{c}bootie", False)),
)
# Coarse kind of each category, for counts ("two shoes and a bag") and "the only shoe".
_KIND = ("clothing", "clothing", "clothing", "clothing", "clothing", "shoe", "clothing", "shoe", "bag", "shoe")
_KIND_WORDS = {
    "clothing": (("piece of clothing", "pieces of clothing"), ("garment", "garments")),
    "shoe": (("shoe", "shoes"), ("piece of footwear", "pieces of footwear")),
    "bag": (("bag", "bags"), ("bag", "bags")),
}

# (name, alternative names, RGB): ten colours that stay distinct when tinting a grey glyph on a dark canvas.
COLOURS = (
    ("red", ("red",), (225, 40, 40)),
    ("orange", ("orange",), (250, 140, 20)),
    ("yellow", ("yellow",), (240, 225, 40)),
    ("green", ("green",), (40, 190, 60)),
    ("blue", ("blue",), (45, 95, 240)),
    ("purple", ("purple", "violet"), (150, 60, 215)),
    ("pink", ("pink",), (255, 125, 200)),
    ("white", ("white",), (240, 240, 240)),
    ("brown", ("brown",), (160, 95, 40)),
    ("cyan", ("cyan", "turquoise"), (30, 215, 215)),
)

# Grid cells in reading order: (canonical name, short labels, prepositional phrases).
POSITIONS = (
    (
        "top left",
        ("top left", "upper left"),
        ("in the top left corner", "at the top left", "in the upper left corner"),
    ),
    ("top", ("top", "top centre", "top middle"), ("at the top", "at the top centre", "in the top middle")),
    (
        "top right",
        ("top right", "upper right"),
        ("in the top right corner", "at the top right", "in the upper right corner"),
    ),
    ("left", ("left", "middle left"), ("on the left", "on the left side", "at the left edge")),
    ("centre", ("centre", "middle", "center"), ("in the centre", "in the middle", "at the center")),
    ("right", ("right", "middle right"), ("on the right", "on the right side", "at the right edge")),
    (
        "bottom left",
        ("bottom left", "lower left"),
        ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    ),
    (
        "bottom",
        ("bottom", "bottom centre", "bottom middle"),
        ("at the bottom", "at the bottom centre", "in the bottom middle"),
    ),
    (
        "bottom right",
        ("bottom right", "lower right"),
        ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
    ),
)
_ROW_PHRASES = (
    ("in the top row", "along the top"),
    ("in the middle row", "across the middle"),
    ("in the bottom row", "along the bottom"),
)
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "middle", "right")
_COL_IN_ROW = ("on the left", "in the middle", "on the right")
_ROW_IN_COL = ("at the top", "in the middle", "at the bottom")

# (name, RGB): dark so that every tint stands out.
BACKGROUNDS = (
    ("black", (6, 6, 8)),
    ("navy blue", (8, 12, 40)),
    ("charcoal", (34, 34, 36)),
    ("dark green", (8, 30, 14)),
    ("maroon", (38, 10, 12)),
)
TEXTURES = ("plain", "speckled", "shaded", "textured")

_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}
_ITEM_WORDS = ("items", "objects", "fashion items", "things", "pieces")

_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
        "objects": datasets.List(
            {
                "category": datasets.Value("string"),
                "colour": datasets.Value("string"),
                "position": datasets.Value("string"),
                "source_index": datasets.Value("int32"),
            }
        ),
        "background": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the original MNIST / Fashion-MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_paths(directory: str, part: str) -> tuple[str, str]:
    return (
        os.path.join(directory, f"{part}-images-idx3-ubyte.gz"),
        os.path.join(directory, f"{part}-labels-idx1-ubyte.gz"),
    )


def load_fashion_mnist(part: str, fashion_mnist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×28×28 uint8) and labels (N,) of Fashion-MNIST ``part`` ("train" or "t10k").

    Reads the Debian package's IDX files from ``fashion_mnist_dir`` (default
    :data:`DEFAULT_FASHION_MNIST_DIR`); falls back to the Hub dataset :data:`FASHION_MNIST_HUB_REPO`.
    """
    if part not in ("train", "t10k"):
        raise ValueError(f"part must be 'train' or 't10k', got {part!r}")
    directory = fashion_mnist_dir or DEFAULT_FASHION_MNIST_DIR
    images_path, labels_path = _idx_paths(directory, part)
    if os.path.isfile(images_path) and os.path.isfile(labels_path):
        return _read_idx(images_path), _read_idx(labels_path)
    try:
        hub = datasets.load_dataset(FASHION_MNIST_HUB_REPO, split="train" if part == "train" else "test")
    except Exception as err:  # offline, not cached, no such repo: all end in the same advice
        raise FileNotFoundError(
            f"Fashion-MNIST is needed to build {FASHION_SCENES!r} and was found nowhere: no IDX files "
            f"{images_path} / {labels_path} (install the Debian package 'dataset-fashion-mnist' or pass "
            f"fashion_mnist_dir= to a folder holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz), "
            f"and the Hub dataset {FASHION_MNIST_HUB_REPO!r} could not be loaded "
            f"({type(err).__name__}: {err}); go online once or pre-download it."
        ) from err
    images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in hub["image"]])
    return images, np.asarray(hub["label"], dtype=np.uint8)


def source_pools(
    num_train_images: int = 60_000, num_test_images: int = 10_000, seed: int = 0
) -> dict[str, tuple[str, np.ndarray]]:
    """Which Fashion-MNIST file ("train" / "t10k") and which of its indices each split draws from.

    Train and validation split the training images once, disjointly (a fixed permutation: the first
    sixth for validation, the rest for train); test uses all of ``t10k`` and nothing else.
    """
    order = np.random.default_rng([seed, 7]).permutation(num_train_images)
    num_validation = num_train_images // 6
    return {
        "train": ("train", np.sort(order[num_validation:])),
        "validation": ("train", np.sort(order[:num_validation])),
        "test": ("t10k", np.arange(num_test_images)),
    }


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


class _Writer:
    """Words for one scene: noun phrases, positions, relations, drawn from one generator."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene, self.rng = scene, rng
        self.objects = list(scene.objects)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def shuffled(self, objects=None) -> list[SceneObject]:
        objects = list(self.objects if objects is None else objects)
        return [objects[i] for i in self.rng.permutation(len(objects))]

    def reading_order(self, objects=None) -> list[SceneObject]:
        return sorted(self.objects if objects is None else objects, key=lambda o: o.cell)

    def colour(self, obj: SceneObject) -> str:
        return self.pick(COLOURS[obj.colour][1])

    def noun(self, obj: SceneObject, det: str = "a", colour: str | None = "pre") -> tuple[str, bool]:
        """A noun phrase for ``obj`` and whether it is grammatically plural.

        ``det``: "a" (a/an, nothing for plurals), "the", or "" (bare); ``colour``: "pre" ("a red
        tee"), "post" ("a tee in red") or None (no colour).
        """
        template, plural = self.pick(_NOUNS[obj.category])
        if colour == "pre":
            text = template.format(c=self.colour(obj) + " ")
        elif colour == "post":
            text = template.format(c="") + " in " + self.colour(obj)
        else:
            text = template.format(c="")
        if det == "the":
            text = "the " + text
        elif det == "a" and not plural:
            text = ("an " if text[0] in "aeiou" else "a ") + text
        return text, plural

    def np(self, obj: SceneObject, det: str = "a", colour: str | None = "pre") -> str:
        return self.noun(obj, det, colour)[0]

    def np_any(self, obj: SceneObject, det: str = "a") -> str:
        """A coloured noun phrase, the colour before the noun most of the time."""
        return self.np(obj, det, "post" if self.rng.random() < 0.2 else "pre")

    def pos(self, obj: SceneObject) -> str:
        return self.pick(POSITIONS[obj.cell][2])

    def label(self, obj: SceneObject) -> str:
        return self.pick(POSITIONS[obj.cell][1])

    def be(self, plural: bool) -> str:
        return "are" if plural else "is"

    def items(self, k: int) -> str:
        return self.pick(_ITEM_WORDS) if k > 1 else "item"

    def background(self) -> str:
        name = BACKGROUNDS[self.scene.background][0]
        texture = TEXTURES[self.scene.texture]
        article = "an" if texture[0] in "aeiou" else "a"
        return self.pick(
            (f"on a {name} background", f"against a {name} backdrop", f"on {article} {texture} {name} background")
        )

    def join(self, parts: list[str]) -> str:
        if len(parts) == 1:
            return parts[0]
        last = ", and " if len(parts) > 2 and self.rng.random() < 0.3 else " and "
        return ", ".join(parts[:-1]) + last + parts[-1]

    def relation(self, a: SceneObject, b: SceneObject) -> str | None:
        """A phrase true of ``a`` relative to ``b`` ("to the left of", "above", ...), or None."""
        options = []
        if a.col < b.col:
            options += ["to the left of", "left of"]
        if a.col > b.col:
            options += ["to the right of", "right of"]
        if a.row < b.row:
            options += ["directly above" if a.col == b.col else "above", "higher up than"]
        if a.row > b.row:
            options += ["directly below" if a.col == b.col else "below", "beneath"]
        if abs(a.row - b.row) + abs(a.col - b.col) == 1:
            options += ["next to", "beside"]
        return self.pick(options) if options else None

    def kind_counts(self) -> str:
        counts: dict[str, int] = {}
        for obj in self.objects:
            counts[_KIND[obj.category]] = counts.get(_KIND[obj.category], 0) + 1
        parts = []
        for kind, n in counts.items():
            singular, plural = self.pick(_KIND_WORDS[kind])
            parts.append(
                f"{_NUMBER[n] if n > 1 else ('an' if singular[0] in 'aeiou' else 'a')} {plural if n > 1 else singular}"
            )
        return self.join(parts)


def _cap(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# Each template: (name, mentions every object with colour and position?, function).
# A function returns None when the scene does not fit it (e.g. no two objects share a row).
_Template = Callable[[_Writer], "str | None"]


def _t_list(w: _Writer) -> str:
    return w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_there_are(w: _Writer) -> str:
    k = len(w.objects)
    lead = w.pick(
        (
            f"there are {_NUMBER[k]} {w.items(k)}",
            f"{_NUMBER[k]} {w.items(k)} are shown",
            f"the image holds {_NUMBER[k]} {w.items(k)}",
        )
    )
    return f"{lead}: " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.reading_order()])


def _t_intro(w: _Writer) -> str:
    intro = w.pick(
        (
            "the picture shows",
            "this image shows",
            "we can see",
            "shown here are",
            "the scene contains",
            "here we have",
            "a photo of",
        )
    )
    return f"{intro} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_labelled(w: _Writer) -> str:
    sep, end = w.pick(((": ", ". "), (" - ", "; "), (": ", "; ")))
    parts = [f"{_cap(w.label(o))[:-1]}{sep}{w.np(o, det=w.pick(('', 'a')))}" for o in w.reading_order()]
    return end.join(parts)


def _t_verbs(w: _Writer) -> str:
    clauses = []
    for o in w.shuffled():
        text, plural = w.noun(o, colour=w.pick(("pre", "pre", "post")))
        verb = w.pick(
            (
                ("sits", "sit"),
                ("lies", "lie"),
                ("rests", "rest"),
                ("is placed", "are placed"),
                ("can be seen", "can be seen"),
                ("appears", "appear"),
            )
        )[plural]
        clauses.append(f"{text} {verb} {w.pos(o)}")
    return w.join(clauses)


def _t_position_first(w: _Writer) -> str:
    order = w.shuffled()
    first_text, first_plural = w.noun(order[0])
    parts = [f"{w.pos(order[0])} there {w.be(first_plural)} {first_text}"]
    parts += [f"{w.pos(o)} {w.np_any(o)}" for o in order[1:]]
    return w.join(parts)


def _t_rows(w: _Writer) -> str:
    sentences = []
    for row in range(GRID):
        in_row = sorted((o for o in w.objects if o.row == row), key=lambda o: o.col)
        if in_row:
            items = w.join([f"{w.np(o)} {_COL_IN_ROW[o.col]}" for o in in_row])
            sentences.append(w.pick((f"{_ROW_NAMES[row]} row: {items}", f"in the {_ROW_NAMES[row]} row, {items}")))
    return ". ".join(_cap(s)[:-1] for s in sentences)


def _t_columns(w: _Writer) -> str:
    parts = []
    for col in range(GRID):
        in_col = sorted((o for o in w.objects if o.col == col), key=lambda o: o.row)
        if in_col:
            verb = w.pick(("holds", "has", "contains"))
            parts.append(
                f"the {_COL_NAMES[col]} column {verb} " + w.join([f"{w.np(o)} {_ROW_IN_COL[o.row]}" for o in in_col])
            )
    return "; ".join(parts)


def _t_count_background(w: _Writer) -> str:
    k = len(w.objects)
    return f"{_NUMBER[k]} {w.items(k)} {w.background()}: " + w.join(
        [f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()]
    )


def _t_left_to_right(w: _Writer) -> str | None:
    if len({o.col for o in w.objects}) < len(w.objects):
        return None
    order = sorted(w.objects, key=lambda o: o.col)
    return w.pick(("from left to right: ", "left to right, there are ", "reading left to right: ")) + w.join(
        [w.np_any(o) for o in order]
    )


def _t_top_to_bottom(w: _Writer) -> str | None:
    if len({o.row for o in w.objects}) < len(w.objects):
        return None
    order = sorted(w.objects, key=lambda o: o.row)
    return w.pick(("from top to bottom: ", "top to bottom: ", "going down the image: ")) + w.join(
        [w.np_any(o) for o in order]
    )


def _t_single(w: _Writer) -> str:
    o = w.pick(w.objects)
    text, plural = w.noun(o, colour=w.pick(("pre", "post")))
    return w.pick(
        (
            f"{text} {w.pos(o)}",
            f"{w.pos(o)}, {text}",
            f"{text} can be seen {w.pos(o)}",
            f"there {w.be(plural)} {text} {w.pos(o)}",
        )
    )


def _t_item_at(w: _Writer) -> str:
    o = w.pick(w.objects)
    return w.pick(
        (f"the item {w.pos(o)} is {w.np(o)}", f"what sits {w.pos(o)} is {w.np(o)}", f"look {w.pos(o)}: {w.np(o)}")
    )


def _t_colour_lookup(w: _Writer) -> str:
    o = w.pick(w.objects)
    thing = w.pick(("item", "thing", "object", "piece"))
    return f"the {w.colour(o)} {thing} {w.pos(o)} is {w.np(o, colour=None)}"


def _pair(w: _Writer) -> tuple[SceneObject, SceneObject, str] | None:
    a, b = w.shuffled()[:2]
    relation = w.relation(a, b)
    return None if relation is None else (a, b, relation)


def _t_relation(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    if w.rng.random() < 0.5:
        return f"{w.np_any(a)} {relation} {w.np_any(b)}"
    text, plural = w.noun(a, det="the")
    return f"{text} {w.be(plural)} {relation} {w.np(b, det='the')}"


def _t_relation_position(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    return f"{w.np_any(a)} {w.pos(a)}, {relation} {w.np_any(b)}"


def _t_with(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    b, a, relation = pair  # b relative to a
    text, plural = w.noun(a)
    return f"{text} {w.pos(a)} with {w.np_any(b)} {relation} {'them' if plural else 'it'}"


def _t_relation_and_third(w: _Writer) -> str | None:
    if len(w.objects) < 3:
        return None
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    c = next(o for o in w.shuffled() if o not in (a, b))
    text, plural = w.noun(a, det="the")
    c_text, c_plural = w.noun(c)
    return f"{text} {w.be(plural)} {relation} {w.np(b, det='the')}, and {c_text} {w.be(c_plural)} {w.pos(c)}"


def _t_contrast(w: _Writer) -> str:
    a, b = w.shuffled()[:2]
    a_text, a_plural = w.noun(a, det="the")
    b_text, b_plural = w.noun(b, det="the")
    link = w.pick((", while", ", whereas", "; meanwhile"))
    return f"{a_text} {w.be(a_plural)} {w.pos(a)}{link} {b_text} {w.be(b_plural)} {w.pos(b)}"


def _t_colour_positions(w: _Writer) -> str:
    some = w.pick(("something", "an item", "a piece"))
    return w.join(
        [
            f"{some} {w.colour(o)} {w.pos(o)}" if some == "something" else f"{some} in {w.colour(o)} {w.pos(o)}"
            for o in w.shuffled()
        ]
    )


def _t_items_positions(w: _Writer) -> str:
    return w.join([f"{w.np(o, colour=None)} {w.pos(o)}" for o in w.shuffled()])


def _t_colour_list(w: _Writer) -> str:
    return w.join([w.np_any(o) for o in w.shuffled()]) + " " + w.background()


def _t_flat_lay(w: _Writer) -> str:
    lead = w.pick(("a flat lay of", "a collection of", "an arrangement of", "a neat layout with"))
    return f"{lead} " + w.join([w.np_any(o) for o in w.shuffled()])


def _t_kind_count(w: _Writer) -> str:
    o = w.pick(w.objects)
    return f"{w.kind_counts()}, with {w.np(o, det='the')} {w.pos(o)}"


def _t_only_kind(w: _Writer) -> str | None:
    kinds = [_KIND[o.category] for o in w.objects]
    unique = [o for o in w.objects if kinds.count(_KIND[o.category]) == 1]
    if not unique:
        return None
    o = w.pick(unique)
    singular = w.pick(_KIND_WORDS[_KIND[o.category]])[0]
    return w.pick(
        (
            f"the only {singular} is {w.np_any(o)} {w.pos(o)}",
            f"{w.np_any(o)} {w.pos(o)} is the only {singular} in the picture",
        )
    )


def _t_empty_centre(w: _Writer) -> str | None:
    if any(o.cell == 4 for o in w.objects):
        return None
    lead = w.pick(("the centre is empty; there is", "nothing in the middle, just", "an empty middle surrounded by"))
    return f"{lead} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_side_by_side(w: _Writer) -> str | None:
    rows = [r for r in range(GRID) if sum(o.row == r for o in w.objects) >= 2]
    if not rows:
        return None
    row = w.pick(rows)
    a, b = sorted((o for o in w.objects if o.row == row), key=lambda o: o.col)[:2]
    # Name the left one by what tells it apart: its colour, or its noun when both share a colour.
    left = w.np(a, det="", colour=None) if a.colour == b.colour else f"{w.colour(a)} one"
    return f"{w.np_any(a)} and {w.np_any(b)} side by side {w.pick(_ROW_PHRASES[row])}, the {left} on the left"


def _t_stacked(w: _Writer) -> str | None:
    cols = [c for c in range(GRID) if sum(o.col == c for o in w.objects) >= 2]
    if not cols:
        return None
    col = w.pick(cols)
    a, b = sorted((o for o in w.objects if o.col == col), key=lambda o: o.row)[:2]
    return f"{w.np_any(a)} above {w.np_any(b)} in the {_COL_NAMES[col]} column"


def _t_one_of(w: _Writer) -> str:
    k, o = len(w.objects), w.pick(w.objects)
    return w.pick(
        (
            f"{_NUMBER[k]} {w.items(k)}, one of them {w.np_any(o)} {w.pos(o)}",
            f"among the {_NUMBER[k]} {w.items(k)} is {w.np_any(o)} {w.pos(o)}",
        )
    )


def _t_includes(w: _Writer) -> str:
    chosen = w.shuffled()[:2]
    lead = w.pick(("the arrangement includes", "the set includes", "among other things there is"))
    return f"{lead} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in chosen])


TEMPLATES: tuple[tuple[str, bool, _Template], ...] = (
    ("list", True, _t_list),
    ("there_are", True, _t_there_are),
    ("intro", True, _t_intro),
    ("labelled", True, _t_labelled),
    ("verbs", True, _t_verbs),
    ("position_first", True, _t_position_first),
    ("rows", True, _t_rows),
    ("columns", True, _t_columns),
    ("count_background", True, _t_count_background),
    ("empty_centre", True, _t_empty_centre),
    ("left_to_right", False, _t_left_to_right),
    ("top_to_bottom", False, _t_top_to_bottom),
    ("single", False, _t_single),
    ("item_at", False, _t_item_at),
    ("colour_lookup", False, _t_colour_lookup),
    ("relation", False, _t_relation),
    ("relation_position", False, _t_relation_position),
    ("with", False, _t_with),
    ("relation_and_third", False, _t_relation_and_third),
    ("contrast", False, _t_contrast),
    ("colour_positions", False, _t_colour_positions),
    ("items_positions", False, _t_items_positions),
    ("colour_list", False, _t_colour_list),
    ("flat_lay", False, _t_flat_lay),
    ("kind_count", False, _t_kind_count),
    ("only_kind", False, _t_only_kind),
    ("side_by_side", False, _t_side_by_side),
    ("stacked", False, _t_stacked),
    ("one_of", False, _t_one_of),
    ("includes", False, _t_includes),
)


def describe_scene(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_SCENE) -> list[tuple[str, str]]:
    """``n`` different captions of ``scene`` as (template name, caption) pairs.

    The first caption mentions every object with its colour and position; the others come from
    distinct templates drawn at random among those that fit the scene (a template may describe a
    subset, a relation, counts, colours only, ...).
    """
    writer = _Writer(scene, rng)
    full = [t for t in TEMPLATES if t[1]]
    first = [full[i] for i in rng.permutation(len(full))]
    rest = [TEMPLATES[i] for i in rng.permutation(len(TEMPLATES))]
    captions: list[tuple[str, str]] = []

    def add(name: str, template: _Template) -> bool:
        if any(name == used for used, _ in captions):
            return False
        text = template(writer)
        if text is None or _cap(text) in (c for _, c in captions):
            return False
        captions.append((name, _cap(text)))
        return True

    next(name for name, _, template in first if add(name, template))  # "list" always fits
    for name, _, template in rest:
        if len(captions) == n:
            break
        add(name, template)
    return captions


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _generate_scenes(
    split: str, num_scenes: int, seed: int, fashion_mnist_dir: str | None, version: str
) -> Iterator[dict]:
    """Rows of one split. Module-level so ``datasets`` hashes it by reference (stable across processes)."""
    del version  # only part of the cache key
    part = "t10k" if split == "test" else "train"
    glyphs, labels = load_fashion_mnist(part, fashion_mnist_dir)
    # The pools only depend on the file sizes, read here from the file itself.
    _, pool = source_pools(len(labels), len(labels), seed)[split]
    by_category = [pool[labels[pool] == c] for c in range(len(CATEGORIES))]
    for i in range(num_scenes):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        scene = _sample_scene(rng, by_category)
        image = _render(scene, glyphs, rng)
        captions = [text for _, text in describe_scene(scene, rng)]
        yield {
            "image": {"bytes": _png(image), "path": None},
            "captions": captions,
            "image_id": f"{split}-{i:05d}",
            "objects": [
                {
                    "category": CATEGORIES[o.category],
                    "colour": COLOURS[o.colour][0],
                    "position": POSITIONS[o.cell][0],
                    "source_index": o.source_index,
                }
                for o in scene.objects
            ],
            "background": f"{TEXTURES[scene.texture]} {BACKGROUNDS[scene.background][0]}",
            "source": part,
        }


def load_fashion_scenes(
    *,
    num_train: int = DEFAULT_SIZES["train"],
    num_validation: int = DEFAULT_SIZES["validation"],
    num_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    fashion_mnist_dir: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Build (first call) or load from the datasets cache (later calls) the fashion-scenes dataset.

    Columns: ``image`` (64×64 RGB PNG), ``captions`` (5 str), ``image_id`` (str, "train-00042"),
    ``objects`` (category, colour, position, source_index per garment), ``background``, ``source``.
    """
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"num_{split} must be a positive int, got {size!r}")
    if fashion_mnist_dir is not None:
        fashion_mnist_dir = os.path.abspath(fashion_mnist_dir)
    splits = {}
    for split, size in sizes.items():
        gen_kwargs = {
            "split": split,
            "num_scenes": size,
            "seed": seed,
            "fashion_mnist_dir": fashion_mnist_dir,
            "version": GENERATOR_VERSION,
        }
        splits[split] = build_cached_split(_generate_scenes, gen_kwargs, _FEATURES, cache_dir, split)
    return datasets.DatasetDict(splits)


def build_cached_split(
    generator: Callable[..., Iterator[dict]],
    gen_kwargs: dict,
    features: datasets.Features,
    cache_dir: str | None,
    split: str,
) -> datasets.Dataset:
    """Build one split with ``Dataset.from_generator`` once, then reuse it from the datasets cache.

    ``generator`` must be a module-level function (hashed by reference) and ``gen_kwargs`` must
    carry a version string. Our own FileNotFoundError / ValueError raised while generating (missing
    Fashion-MNIST, missing image file) come out as they are, not wrapped in datasets' generic
    DatasetGenerationError.
    """
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir, split=datasets.NamedSplit(split)
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, (FileNotFoundError, ValueError)):
            raise err.__cause__ from None
        raise
