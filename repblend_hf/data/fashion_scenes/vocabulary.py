"""What fashion-scenes is made of: its name and cache version, its sizes, and the words and colours of its scenes.

Shared by the scene layout (:mod:`.scenes`), the captions (:mod:`.captions`) and the builder (:mod:`.builder`).
"""

from __future__ import annotations

FASHION_SCENES = "fashion-scenes"
# Part of the cache key: bump when images, captions or columns change.
GENERATOR_VERSION = "fashion-scenes-v2"

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
